"""The layering of docs/architecture.md, held by the code: who may import whom, no import cycle
between files, imports at the top (a lazy one only where it keeps a heavy library out of a
process, with the reason beside it); and the path of one classify item, from ``POST
/api/v1/jobs`` to its stored result, through a bounded number of the project's functions."""

from __future__ import annotations

import ast
import sys
import tarfile
import threading
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mmbatch", "media", "models", "store", "worker", "web", "cli", "samples")
# package -> what it must never import (project packages and libraries)
NEVER = {
    "mmbatch": {"media", "models", "store", "worker", "web", "cli", "samples", "torch", "flask",
                "celery", "sqlalchemy"},
    "media": {"models", "store", "worker", "web", "cli", "torch", "flask", "celery",
              "sqlalchemy"},
    "models": {"store", "web", "worker", "cli", "samples", "media", "flask", "celery",
               "sqlalchemy"},
    "store": {"models", "web", "worker", "cli", "media", "torch", "flask", "celery",
              "transformers", "timm"},
    "web": {"models", "worker", "cli", "torch", "transformers", "timm", "torchaudio"},
    "worker": {"web", "cli"},
}
# modules of a banned package a part may still import: models may use the vocabulary and scores
ALLOWED = {"models": {"mmbatch.contract", "mmbatch.scoring"}}
MAX_INNER_IMPORTS = 20


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in MODULES:
            return ".".join(parts[:i])
    return None


def _imports() -> list[tuple[str, int, set[str], set[str], bool, ast.AST]]:
    """Per import statement: (module, line, project modules it names, top-level names it
    imports, whether it sits inside a function, the node)."""
    found = []
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
                targets = {_resolve(n) for n in names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
                    base = ".".join(here[: len(here) - node.level + 1] + [base] if base else [])
                names = [base]
                targets = {_resolve(f"{base}.{a.name}") for a in node.names} or {_resolve(base)}
            else:
                continue
            targets = {t for t in targets if t and t != mod}
            inner, p = False, node
            while p in parents:
                p = parents[p]
                inner = inner or isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef))
                if isinstance(p, ast.If) and "TYPE_CHECKING" in ast.unparse(p.test):
                    break
            else:
                found.append((mod, node.lineno, targets, {n.split(".")[0] for n in names},
                              inner, node))
    return found


IMPORTS = _imports()


def test_no_package_imports_what_its_layer_must_not() -> None:
    broken = []
    for mod, line, targets, tops, _, _ in IMPORTS:
        pkg = mod.split(".")[0]
        banned = NEVER.get(pkg, set())
        hit = {t.split(".")[0] for t in targets if t not in ALLOWED.get(pkg, set())}
        hit |= {t for t in tops if _resolve(t) is None}
        broken += [f"{mod}:{line} -> {b}" for b in sorted(hit & banned)]
    assert broken == []


def test_no_import_cycle_between_files() -> None:
    edges: dict[str, set[str]] = {}
    for mod, _, targets, _, _, _ in IMPORTS:
        edges.setdefault(mod, set()).update(targets)
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in MODULES:
        if v not in index:
            visit(v)
    assert cycles == []


def test_imports_are_at_the_top_unless_a_comment_says_why() -> None:
    inner = [(mod, line) for mod, line, targets, _, is_inner, _ in IMPORTS
             if is_inner and targets]
    assert len(inner) <= MAX_INNER_IMPORTS, inner
    for mod, line in inner:
        lines = MODULES[mod].read_text().splitlines()
        around = " ".join(lines[max(0, line - 3):line])
        assert "#" in around, f"{mod}:{line}: an import inside a function says why"


def test_the_api_process_never_imports_torch() -> None:
    """What web imports, transitively, stays clear of the model stack."""
    seen, todo = set(), ["web.app", "web.wsgi"]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        for m, _, targets, tops, inner, _ in IMPORTS:
            if m == mod and not inner:
                assert not tops & {"torch", "torchaudio", "transformers", "timm"}, mod
                todo += sorted(targets)
    assert not any(m.startswith(("models", "worker")) for m in seen), sorted(seen)


# --- the path of one item -------------------------------------------------------------------

# Distinct project functions (comprehensions included) that one classify item passes through,
# from POST /api/v1/jobs to its stored result, in a warm worker (encoders and classifier
# loaded): 226 before the code was given one home per concern, 236 after (docs/architecture.md
# says where they go), 251 once a request is checked for stray parts and a reused idempotency
# key, a caption's encoding is detected and reported, and a job's class warnings are kept; 255
# once an upload and a JSON train request share the checks of a key and a callback and the
# creation of a job (web.service); 259 once batches are planned in the database and a
# dispatcher sends them a window at a time by priority (store.dispatch: plan, claim, the time
# comparison; web.service: the job's priority); 277 once the default model stacks feature
# families (models.families: each family computed from the decoded file and cached, a sparse
# one expanded; models.fusion: each column's head and the meta-model); 278 once a classify job
# may adapt its model first (mmbatch.contract.training_step: what follows the batches); 281 once
# an explanation groups a model's columns by modality (models.explain); 294 once ingest streams
# (media.archive hands complete items over a chunk at a time, with their labels so far and a
# clip's sound track; worker.ingest.Stream inserts, counts, plans and sends each chunk, and
# joins what the walk learnt late; a batch read during the walk checks its files are still the
# item's); 296 once a streamed walk keeps counters instead of its items (media.archive: the
# items' one top folder noted, a late member joined). A change that makes the path longer
# raises this on purpose.
PATH_FUNCTIONS = 296


def _one_item_archive(tmp_path: Path) -> Path:
    from samples.sample import write_sample

    fresh = write_sample(tmp_path / "fresh", n_train=8, n_unlabelled=2, seed=5)
    with tarfile.open(fresh.unlabelled) as tf:
        members = [m for m in tf.getmembers() if m.isfile()]
        first = sorted({m.name.rsplit(".", 1)[0] for m in members})[0]
        files = {m.name: tf.extractfile(m).read() for m in members  # type: ignore[union-attr]
                 if m.name.rsplit(".", 1)[0] == first}
    from tests.util import write_tar

    return write_tar(tmp_path / "one.tar", files)


@pytest.mark.integration
def test_one_classify_item_passes_through_few_functions(tmp_path: Path, sample_dir: Any) -> None:
    from store import keys
    from tests.util import embedded_runtime, run_in_process
    from web.app import create_app

    rt = embedded_runtime(tmp_path)
    with rt.db.session() as s:
        key = keys.create_key(s, "path", "path").key
    app = create_app(rt.settings)
    app.extensions["mmbatch"].celery.send_task = lambda *a, **kw: None  # the worker is here
    client = app.test_client()
    headers = {"Authorization": f"Bearer {key}"}

    def run(path: Path, kind: str, **form: str) -> str:
        return run_in_process(rt, client, path, kind, headers, **form)

    try:
        run(sample_dir.train, "train", epochs="3")
        run(sample_dir.unlabelled, "classify")  # a warm worker: encoders and model loaded
        one = _one_item_archive(tmp_path)
        seen: set[tuple[str, int, str]] = set()

        def profile(frame: Any, event: str, arg: Any) -> None:
            code = frame.f_code
            if event == "call" and code.co_filename.startswith(str(ROOT)):
                rel = Path(code.co_filename).relative_to(ROOT)
                if rel.parts[0] in PACKAGES:
                    seen.add((str(rel), code.co_firstlineno, code.co_name))

        threading.setprofile(profile)
        sys.setprofile(profile)
        try:
            job_id = run(one, "classify")
            page = client.get(f"/api/v1/jobs/{job_id}/results", headers=headers).get_json()
        finally:
            sys.setprofile(None)
            threading.setprofile(None)  # type: ignore[arg-type]
        assert [item["status"] for item in page["items"]] == ["ok"]
        print(f"\none classify item: {len(seen)} project functions in "
              f"{len({f for f, _, _ in seen})} files")
        assert len(seen) <= PATH_FUNCTIONS, sorted(seen)
    finally:
        rt.close()
