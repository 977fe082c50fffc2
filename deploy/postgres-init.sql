-- One Postgres for both services: MLflow uses the database `mlflow` (POSTGRES_DB), Prefect this one.
CREATE DATABASE prefect;
