-- One PostgreSQL for both servers: a database each (run once, on the first start of the volume).
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
