"""What every stage flow shares in MLflow (flows/tracking.py)."""

from __future__ import annotations

from softcon.flows.tracking import runs_table_url


def test_links_open_the_runs_table_in_mlflow_3_s_model_training_view() -> None:
    """MLflow 3 opens an experiment on its GenAI overview unless the link chooses the model-training view (checked
    in a real browser against mlflow 3.17: with the parameter `#/experiments/1` lands on `#/experiments/1/runs`)."""
    assert runs_table_url("http://127.0.0.1:5000/", "7") == (
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    )
    assert runs_table_url("http://mlflow:5000") == "http://mlflow:5000/#/experiments?workflowType=machine_learning"
