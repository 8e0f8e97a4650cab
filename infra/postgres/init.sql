-- The Prefect server uses the default database `prefect`; MLflow gets its own.
CREATE DATABASE mlflow;
