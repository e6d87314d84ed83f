"""What every stage flow shares in MLflow (flows/tracking.py)."""

from __future__ import annotations


def test_the_project_s_experiments_open_on_the_runs_table() -> None:
    """MLflow 3 opens an experiment without a kind on its GenAI overview; the project's are model development."""
    import mlflow

    from softcon.flows.tracking import EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT, use_experiment

    created = use_experiment("softcon-kind-test")
    assert mlflow.get_experiment(created).tags[EXPERIMENT_KIND_TAG] == MODEL_DEVELOPMENT
    client = mlflow.MlflowClient()
    older = client.create_experiment("softcon-kind-test-older")  # made before the tag existed
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(older).tags
    assert use_experiment("softcon-kind-test-older") == older
    assert client.get_experiment(older).tags[EXPERIMENT_KIND_TAG] == MODEL_DEVELOPMENT
