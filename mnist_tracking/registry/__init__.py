"""The Model Registry: registering a training run's model, the alias rule and its lock, experiments' best runs;
imports core and tracking."""
