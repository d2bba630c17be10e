"""No pickle anywhere: JSON task messages, safetensors checkpoints, torch.load only on the
packaged ImageNet weights and then with weights_only, numpy.load (search index files) only with
allow_pickle=False."""

from __future__ import annotations

import ast
from pathlib import Path

from mmbatch.settings import Settings
from worker.app import create_celery

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mmbatch", "models", "store", "worker", "web", "bench")


def _sources() -> list[Path]:
    return [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def test_celery_speaks_json_only(tmp_path: Path) -> None:
    app = create_celery(Settings.from_env({"MMBATCH_DATA_DIR": str(tmp_path)}))
    assert app.conf.task_serializer == "json"
    assert list(app.conf.accept_content) == ["json"]
    assert app.conf.result_backend is None


def test_no_module_imports_pickle_and_torch_load_is_weights_only() -> None:
    offenders = []
    for path in _sources():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "cloudpickle")
                   for n in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports pickle")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id in ("np", "numpy")
                    and not any(k.arg == "allow_pickle" and isinstance(k.value, ast.Constant)
                                and k.value.value is False for k in node.keywords)):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} numpy.load without "
                                 "allow_pickle=False")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "torch"):
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant)
                           and k.value.value is True for k in node.keywords)
                if not safe:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} torch.load "
                                     "without weights_only=True")
    assert offenders == []
    assert len(_sources()) > 40  # the scan did look at the project
