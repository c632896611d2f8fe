-- The stack's Postgres holds two databases: mlflow (created by POSTGRES_DB) and this one for the Prefect server.
CREATE DATABASE prefect;
