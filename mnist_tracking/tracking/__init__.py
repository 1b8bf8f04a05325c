"""The MLflow side: runs and where each ends, artifacts, checkpoints, and one orchestration per analysis entry point;
imports core and views."""
