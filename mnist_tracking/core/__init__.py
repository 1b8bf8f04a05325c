"""The pure core: model, data, training loop, embeddings, scores, configs, the stop flag;
imports no MLflow, Ray or click."""
