"""The MLflow model registry, written and read: aliases on encoder versions, evaluation results on them.

- Each train run registers its encoder as a new version of ``TrainConfig.registered_model_name``. MLflow reserves
  the alias name ``latest``, so ``models:/NAME@latest`` and ``models:/NAME/latest`` are resolved here to the
  newest version instead of being set.
- Each evaluate run of a registered encoder (``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` or the train run id
  behind a version) tags the version with its results (``eval.<metric>``, ``eval.run_id``) and moves the alias
  ``best`` to it when its ``EvaluateConfig.best_metric`` beats the version that holds ``best`` now.
- ``models:/…`` URIs resolve to the train run behind the version (``registry_run_id``) wherever a model is taken.
"""

from __future__ import annotations

import logging

import mlflow

REGISTRY_PREFIX = "models:/"
LATEST, BEST = "latest", "best"
EVAL_TAG = "eval."

logger = logging.getLogger(__name__)


def registry_version(uri: str) -> tuple[str, str]:
    """(name, version) of ``models:/name/version`` or ``models:/name@alias``.

    Raises:
        ValueError: a malformed URI, or a name, version or alias the registry does not hold (named).
    """
    reference = uri.removeprefix(REGISTRY_PREFIX)
    client = mlflow.MlflowClient()
    try:
        name, _, which = reference.rpartition("@") if "@" in reference else reference.rpartition("/")
        if which == LATEST and name:
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise ValueError(f"the model registry at {mlflow.get_tracking_uri()} has no versions of {name!r}")
            return name, str(max(int(v.version) for v in versions))
        if "@" in reference:
            name, alias = reference.rsplit("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, number = reference.rsplit("/", 1)
            version = client.get_model_version(name, number)
    except ValueError as error:
        if "has no versions" in str(error):
            raise
        raise ValueError(f"{uri!r} is not models:/NAME/VERSION or models:/NAME@ALIAS") from None
    except Exception as error:  # MLflow raises its own exception types for an unknown name, version or alias
        raise ValueError(f"the model registry at {mlflow.get_tracking_uri()} has no {uri!r}: {error}") from error
    return str(version.name), str(version.version)


def registry_run_id(uri: str) -> str:
    """The train run behind a registered model version: ``models:/name/version`` or ``models:/name@alias``.

    Raises:
        ValueError: a malformed URI, an unknown name, version or alias, or a version registered without a run.
    """
    name, version = registry_version(uri)
    run_id = mlflow.MlflowClient().get_model_version(name, version).run_id
    if not run_id:
        raise ValueError(f"{uri!r} was registered without a run; this needs the train run that made it")
    return str(run_id)


def versions_of(model: str) -> list[tuple[str, str]]:
    """The registered versions an evaluated model stands for: the version of a ``models:/`` URI, or every version
    registered from a train run id; none for a checkpoint file."""
    if model.startswith(REGISTRY_PREFIX):
        return [registry_version(model)]
    client = mlflow.MlflowClient()
    try:
        found = client.search_model_versions(f"run_id = '{model}'")
    except Exception:  # not a run id the registry can search for (a file path, say)
        return []
    return [(str(v.name), str(v.version)) for v in found]


def _metric_value(metrics: dict[str, float], metric: str) -> float | None:
    """The model's own value of ``metric``: the key itself or a dataset's (``bigearthnet/<metric>``)."""
    for key, value in metrics.items():
        if not key.startswith("baselines/") and (key == metric or key.endswith(f"/{metric}")):
            return value
    return None


def record_evaluation(model: str, metrics: dict[str, float], run_id: str, best_metric: str) -> list[str]:
    """Tag each registered version of ``model`` with the evaluation's own metrics and its run; move ``best`` to it
    when its ``best_metric`` is higher than that of the version holding ``best``. Returns what it did, per version.
    """
    client = mlflow.MlflowClient()
    done = []
    for name, version in versions_of(model):
        own = {key: value for key, value in metrics.items() if not key.startswith("baselines/")}
        for key, value in own.items():
            client.set_model_version_tag(name, version, f"{EVAL_TAG}{key}", f"{value:.6g}")
        client.set_model_version_tag(name, version, f"{EVAL_TAG}run_id", run_id)
        score = _metric_value(own, best_metric)
        if score is None:
            done.append(f"{name} v{version}: tagged (no {best_metric} for 'best')")
            continue
        try:
            holder = client.get_model_version_by_alias(name, BEST)
            held = _metric_value(
                {k.removeprefix(EVAL_TAG): float(v) for k, v in holder.tags.items() if k.startswith(EVAL_TAG)
                 and k != f"{EVAL_TAG}run_id"},
                best_metric,
            )  # fmt: skip
        except Exception:  # no version holds "best" yet
            holder, held = None, None
        if holder is None or held is None or score > held or str(holder.version) == version:
            client.set_registered_model_alias(name, BEST, version)
            done.append(f"{name} v{version}: {best_metric} {score:.4f}, alias '{BEST}'")
        else:
            done.append(f"{name} v{version}: {best_metric} {score:.4f} (best is v{holder.version}, {held:.4f})")
    for line in done:
        logger.info("model registry: %s", line)
    return done
