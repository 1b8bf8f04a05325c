"""Pure drawing: matplotlib figures, the HTML views, sprites, the projector export;
imports core only, no MLflow, Ray or click."""
