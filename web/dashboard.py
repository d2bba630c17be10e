"""The dashboard under /ui: server-rendered pages over the same service functions as the API.

Signing in takes an API key once; the signed session cookie then carries the key's id, never the
key, and every request checks that the key still exists and is not revoked. The tenant is the
key's, exactly as for the API: another tenant's job or model answers 404. Every POST needs the
session's CSRF token, as a ``csrf_token`` form field or an ``X-CSRF-Token`` header (the page's
JavaScript sends the header); without it the answer is 400.

Job creation and cancelling call the same services as the API (``web.service``), with the
session's principal in place of a bearer key, so the two front doors cannot drift apart.
"""

from __future__ import annotations

import datetime as dt
import hmac
import mimetypes
import os
import secrets
import tempfile
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Flask,
    Response,
    current_app,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    send_file,
    session,
    url_for,
)
from werkzeug.datastructures import MultiDict

from mmbatch.contract import (
    AUDIO_SOURCE_VIDEO,
    PRIORITIES,
    SEARCH_MODALITIES,
    TERMINAL_STATES,
)
from mmbatch.settings import Settings
from store import jobs, keys
from store import search as search_store
from store.blobs import BlobNotFound
from store.registry import default_model, get_model, list_models
from store.schema import ApiKey, Item, Job
from web import auth, search, service
from web.api import job_response
from web.errors import ApiError
from web.exports import export as stream_export
from web.serializers import job_payload, model_payload, result_payload
from web.thumbnails import Thumbnails, thumbnail_response

dashboard = Blueprint("dashboard", __name__, url_prefix="/ui", template_folder="templates",
                      static_folder="static", static_url_path="/static")

SECRET_FILE = "secret-key"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
PAGE = 50          # results per job page
LIST = 50          # jobs on the jobs page
FAILED_SHOWN = 100
CAPTION_CHARS = 400
PUBLIC = {"dashboard.login", "dashboard.static"}
EXPORTS = ("jsonl", "csv", "parquet")


def init_app(app: Flask, settings: Settings) -> None:
    """Mount the dashboard: the session's secret, cookie flags, the blueprint, thumbnails."""
    app.secret_key = secret_key(settings)
    app.config.update(SESSION_COOKIE_NAME="mmbatch_session", SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Lax",
                      PERMANENT_SESSION_LIFETIME=dt.timedelta(days=7))
    svc = app.extensions["mmbatch"]
    app.extensions["mmbatch_thumbnails"] = Thumbnails(
        settings.data_dir.resolve() / "thumbnails", svc.blobs, settings.max_image_pixels,
        timeout=settings.decode_timeout_seconds)
    app.register_blueprint(dashboard)
    app.add_url_rule("/", "dashboard_root", lambda: redirect(url_for("dashboard.jobs_page")))


def secret_key(settings: Settings) -> str:
    """MMBATCH_SECRET_KEY, else ``$DATA_DIR/secret-key``, made once (like the first API key).

    Several web processes may start at once: the file is written aside and linked into place,
    which fails for all but the first, and every process then reads the one that won.
    """
    if settings.secret_key:
        return settings.secret_key
    path = settings.data_dir.resolve() / SECRET_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".secret-", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    key = path.read_text().strip()
    if len(key) < 32:
        raise RuntimeError(f"{path} holds no usable secret key; delete it to make a new one")
    return key


def _services() -> Any:
    return current_app.extensions["mmbatch"]


# --- session, sign-in and CSRF ------------------------------------------------------------------

def csrf_token() -> str:
    token = session.get("csrf")
    if not token:
        token = session["csrf"] = secrets.token_urlsafe(32)
    return str(token)


@dashboard.app_context_processor
def _template_globals() -> dict[str, Any]:
    return {"csrf_token": csrf_token}


@dashboard.before_request
def _guard():  # type: ignore[no-untyped-def]
    if request.method == "POST":
        _check_csrf()
    if request.endpoint in PUBLIC:
        return None
    principal = _session_principal()
    if principal is None:
        if request.method == "GET" and not request.path.startswith("/ui/api/"):
            return redirect(url_for("dashboard.login", next=request.full_path.rstrip("?")))
        raise ApiError(401, "unauthorized", "sign in at /ui/login first")
    g.principal = principal
    return None


def _check_csrf() -> None:
    expected = session.get("csrf")
    # The header first: checking it does not parse (and store) a multipart upload.
    sent = request.headers.get(CSRF_HEADER) or request.form.get(CSRF_FIELD)
    if not expected or not sent or not hmac.compare_digest(str(expected), sent):
        raise ApiError(400, "csrf_failed",
                       "the form's CSRF token is missing or stale: reload the page and retry")


def _session_principal() -> auth.Principal | None:
    key_id = session.get("key_id")
    if not isinstance(key_id, int):
        return None
    with _services().db.session() as s:
        row = s.get(ApiKey, key_id)
        if row is None or row.revoked_at is not None:
            session.pop("key_id", None)
            return None
        return auth.Principal(row.id, row.tenant_id, row.webhook_secret, row.max_priority)


@dashboard.after_request
def _headers(response: Response) -> Response:
    response.headers.setdefault(
        "Content-Security-Policy",
        "default-src 'self'; img-src 'self' data:; media-src 'self'; script-src 'self'; "
        "style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; form-action 'self'")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    if response.mimetype == "text/html":
        response.headers.setdefault("Cache-Control", "no-store")
    return response


def _safe_next(target: str | None) -> str:
    """Only a path on this site under /ui (no open redirects)."""
    if target and target.startswith("/ui") and not urlsplit(target).netloc \
            and not target.startswith("//"):
        return target
    return url_for("dashboard.jobs_page")


@dashboard.route("/login", methods=["GET", "POST"])
def login():  # type: ignore[no-untyped-def]
    error = None
    status = 200
    if request.method == "POST":
        key = request.form.get("api_key", "").strip()
        with _services().db.session() as s:
            row = keys.authenticate(s, key) if key else None
            key_id = None if row is None else row.id
        if key_id is not None:
            session.clear()  # a fresh session (and CSRF token) on sign-in
            session.permanent = True
            session["key_id"] = key_id
            csrf_token()
            return redirect(_safe_next(request.form.get("next")), code=303)
        error, status = "That key is unknown or revoked.", 401
    return render_template("dashboard/login.html", error=error,
                           next=_safe_next(request.args.get("next") or request.form.get("next"))
                           ), status


@dashboard.post("/logout")
def logout():  # type: ignore[no-untyped-def]
    session.clear()
    return redirect(url_for("dashboard.login"), code=303)


# --- jobs ---------------------------------------------------------------------------------------

def _jobs_payload() -> list[dict[str, Any]]:
    with _services().db.session() as s:
        rows = jobs.list_jobs(s, auth.tenant_id(), before=None, limit=LIST)
        return [_job_view(s, j) for j in rows]


def _job_view(s: Any, job: Job) -> dict[str, Any]:
    payload = job_payload(s, job)
    payload["links"]["page"] = url_for("dashboard.job_page", job_id=job.id)
    payload["links"]["cancel"] = url_for("dashboard.cancel", job_id=job.id)
    payload["links"]["poll"] = url_for("dashboard.job_json", job_id=job.id)
    payload["terminal"] = job.state in TERMINAL_STATES
    return payload


@dashboard.get("/")
def jobs_page():  # type: ignore[no-untyped-def]
    with _services().db.session() as s:
        model = default_model(s, auth.tenant_id())
        model_name = None if model is None else f"{model.name} v{model.version}"
    allowed = PRIORITIES[PRIORITIES.index(auth.current().max_priority):]  # what the key may ask
    return render_template("dashboard/jobs.html", jobs=_jobs_payload(), default_model=model_name,
                           priorities=allowed)


@dashboard.get("/api/jobs")
def jobs_json():  # type: ignore[no-untyped-def]
    return jsonify({"jobs": _jobs_payload()})


@dashboard.get("/api/jobs/<job_id>")
def job_json(job_id: str):  # type: ignore[no-untyped-def]
    with _services().db.session() as s:
        return jsonify(_job_view(s, service.get_job_or_404(s, job_id)))


@dashboard.post("/jobs")
def upload():  # type: ignore[no-untyped-def]
    """The upload form: the API's job creation, answered as JSON to the page's script or with
    a redirect to the job's page for a plain form post."""
    idem = request.headers.get("Idempotency-Key", "").strip() or None
    form = MultiDict(request.form)
    form.pop(CSRF_FIELD, None)  # the page's, not the job's
    job_id, created = service.submit_job(_services(), request.mimetype, form, request.files,
                                         idem)
    if request.headers.get(CSRF_HEADER):
        return job_response(job_id, status=202 if created else 200)
    return redirect(url_for("dashboard.job_page", job_id=job_id), code=303)


@dashboard.post("/jobs/<job_id>/cancel")
def cancel(job_id: str):  # type: ignore[no-untyped-def]
    service.cancel_job(_services(), job_id)
    if request.headers.get(CSRF_HEADER):
        with _services().db.session() as s:
            return jsonify(job_payload(s, service.get_job_or_404(s, job_id)))
    return redirect(_safe_next(request.form.get("next")), code=303)


@dashboard.get("/jobs/<job_id>")
def job_page(job_id: str):  # type: ignore[no-untyped-def]
    after = _after_arg()
    with _services().db.session() as s:
        job = service.get_job_or_404(s, job_id)
        view = _job_view(s, job)
        rows = jobs.results_page(s, job, after=after, limit=PAGE + 1)
        more = len(rows) > PAGE
        rows = rows[:PAGE]
        results = [_row(job, item, result) for item, result in rows]
        failed = [_row(job, item, result) for item, result in
                  jobs.results_page(s, job, after=0, limit=FAILED_SHOWN, failed_only=True)]
        report = dict(job.report or {})
    next_url = url_for("dashboard.job_page", job_id=job_id, after=rows[-1][0].id) if more else None
    return render_template("dashboard/job.html", job=view, results=results, failed=failed,
                           failed_shown=FAILED_SHOWN, report=report, next_url=next_url,
                           first_page=after == 0, exports=EXPORTS)


REVIEW_PAGE = 12


@dashboard.get("/jobs/<job_id>/review")
def review_page(job_id: str):  # type: ignore[no-untyped-def]
    """A classify job's least sure predictions nobody has labelled yet, with one-key accept
    (a) and correct (1-9: the model's classes), j/k to move."""
    strategy = "diverse" if request.args.get("strategy") == "diverse" else "uncertain"
    page = service.review_page(_services(), job_id, strategy, REVIEW_PAGE, None)
    with _services().db.session() as s:
        job = service.get_job_or_404(s, job_id)
        view = _job_view(s, job)
        classes = list(get_model(s, job.model_version_id).classes) \
            if job.model_version_id is not None else []
        items = {item.id: (item, result) for item, result in
                 jobs.results_page_of(s, job, [r["item"] for r in page.items])}
        rows = [{**_row(job, *items[r["item"]]), "reason": r["reason"]}
                for r in page.items if r["item"] in items]
    return render_template("dashboard/review.html", job=view, rows=rows, classes=classes,
                           strategy=strategy)


SEARCH_PAGE = 24


@dashboard.route("/search", methods=["GET", "POST"])
def search_page():  # type: ignore[no-untyped-def]
    """Search the tenant's archive: by text (GET ``q``), by an example file (POST, multipart
    ``file``), or for items like one (GET ``item``); ``modality`` and ``label`` narrow it.
    The same checks and search as ``POST /api/v1/search`` (``web.search``); what a user got
    wrong, or a search that cannot run yet, is said on the page with the API's status."""
    form = request.form if request.method == "POST" else request.args
    upload = request.files.get("file") if request.method == "POST" else None
    if upload is not None and not upload.filename:
        upload = None
    asked = {"q": (form.get("q") or "").strip(), "modality": form.get("modality") or "any",
             "label": (form.get("label") or "").strip(), "item": form.get("item") or ""}
    view = {"asked": asked, "modalities": SEARCH_MODALITIES, "rows": [], "error": None,
            "next_url": None, "searched": False, "by_file": upload is not None}
    if not (asked["q"] or asked["item"] or upload is not None):
        return render_template("dashboard/search.html", **view)
    body = {"text": asked["q"] or None, "modality": asked["modality"], "k": SEARCH_PAGE,
            "labels": [asked["label"]] if asked["label"] else None,
            "cursor": form.get("cursor") or None}
    try:
        item = None
        if asked["item"]:
            item = int(asked["item"]) if asked["item"].isascii() and asked["item"].isdecimal() \
                else 0
            with _services().db.session() as s:
                search.item_or_404(s, item)
        answer = search.search(_services(), search.parse(body, upload, item=item),
                               body["cursor"])
    except ApiError as exc:
        return render_template("dashboard/search.html", **{**view, "error": exc.message,
                                                             "searched": True}), exc.status
    ids = [r["item"] for r in answer["results"]]
    with _services().db.session() as s:
        found = search_store.hit_rows(s, auth.tenant_id(), ids)
    rows = []
    for hit in answer["results"]:
        item_row, _ = found[hit["item"]]
        media = item_row.media or {}
        rows.append({**hit,
                     "thumb": url_for("dashboard.thumbnail", job_id=hit["job"],
                                      item_id=hit["item"]) if "image" in media else None,
                     "audio": url_for("dashboard.media", job_id=hit["job"], item_id=hit["item"],
                                      modality="audio") if "audio" in media else None,
                     # a clip plays from the frame that matched (a media fragment, #t=seconds)
                     "video": url_for("dashboard.media", job_id=hit["job"], item_id=hit["item"],
                                      modality="video") + (f"#t={hit['time']:.3f}"
                                                           if "time" in hit else "")
                     if "video" in media else None,
                     "poster": url_for("dashboard.poster", job_id=hit["job"], item_id=hit["item"])
                     if "video" in media else None,
                     "caption": _caption(media.get("text")),
                     "job_page": url_for("dashboard.job_page", job_id=hit["job"]),
                     "similar": url_for("dashboard.search_page", item=hit["item"],
                                        modality=asked["modality"])})
    if answer["next_cursor"] and upload is None:  # a file is not sent again for a next page
        view["next_url"] = url_for("dashboard.search_page", cursor=answer["next_cursor"],
                                   **{k: v for k, v in asked.items() if v})
    return render_template("dashboard/search.html", **{**view, "rows": rows, "searched": True,
                                                         "model": answer["model"]})


@dashboard.post("/jobs/<job_id>/items/<int:item_id>/label")
def label_item(job_id: str, item_id: int):  # type: ignore[no-untyped-def]
    """Accept or correct one item's label from the review page, then back to it."""
    with _services().db.session() as s:
        job = service.get_job_or_404(s, job_id)
        if not jobs.belongs(s, job, [item_id]):
            raise ApiError(404, "not_found", f"no item {item_id} in job {job_id}")
        model = job.model_version_id
    service.correct_label(_services(), item_id, {"label": request.form.get("label", ""),
                                                 "model": model})
    target = request.form.get("next")
    return redirect(_safe_next(target) if target
                    else url_for("dashboard.review_page", job_id=job_id), code=303)


def _after_arg() -> int:
    raw = request.args.get("after", "")
    if not raw:
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "invalid_after", "after must be an item id")
    if value < 0:
        raise ApiError(400, "invalid_after", "after must be an item id")
    return value


def _row(job: Job, item: Item, result: Any) -> dict[str, Any]:
    """An item's result as the API shows it, with what the page draws: media links, the
    caption, contribution bars."""
    media = item.media or {}
    explanation = (result.explanation if result is not None else None) or {}
    contributions = [
        {"modality": m, "value": float(v), "width": min(abs(float(v)), 1.0) * 100,
         "sign": "pos" if float(v) >= 0 else "neg"}
        for m, v in (explanation.get("leave_one_out") or {}).items()]
    weights = [{"modality": m, "value": float(w), "width": min(max(float(w), 0.0), 1.0) * 100}
               for m, w in (explanation.get("weights") or {}).items()]
    return {
        **result_payload(item, result),
        "thumb": url_for("dashboard.thumbnail", job_id=job.id, item_id=item.id)
        if "image" in media else url_for("dashboard.poster", job_id=job.id, item_id=item.id)
        if "video" in media else None,
        "video": url_for("dashboard.media", job_id=job.id, item_id=item.id, modality="video")
        if "video" in media else None,
        # the clip's own player plays its sound track
        "audio": url_for("dashboard.media", job_id=job.id, item_id=item.id, modality="audio")
        if "audio" in media and media["audio"].get("source") != AUDIO_SOURCE_VIDEO else None,
        "caption": _caption(media.get("text")),
        "contributions": contributions,
        "weights": weights,
        "weights_kind": explanation.get("weights_kind"),
    }


def _caption(text: dict[str, Any] | None) -> str | None:
    if not text or not text.get("blob"):
        return None
    try:
        with _services().blobs.open(text["blob"]) as f:
            raw = f.read(CAPTION_CHARS * 4 + 4)
    except BlobNotFound:
        return None
    caption = raw.decode("utf-8", errors="replace")
    return caption if len(caption) <= CAPTION_CHARS else caption[:CAPTION_CHARS] + "…"


def _item_media(job_id: str, item_id: int, modality: str) -> dict[str, Any]:
    with _services().db.session() as s:
        job = service.get_job_or_404(s, job_id)
        if not jobs.belongs(s, job, [item_id]):
            raise ApiError(404, "not_found", f"no item {item_id} in job {job_id}")
        item = s.get(Item, item_id)
        entry = (item.media or {}).get(modality) if item is not None else None
    if not entry or not entry.get("blob"):
        raise ApiError(404, "not_found", f"item {item_id} has no {modality}")
    return dict(entry)


@dashboard.get("/jobs/<job_id>/items/<int:item_id>/thumb.jpg")
def thumbnail(job_id: str, item_id: int):  # type: ignore[no-untyped-def]
    entry = _item_media(job_id, item_id, "image")
    return thumbnail_response(entry, item_id)


@dashboard.get("/jobs/<job_id>/items/<int:item_id>/poster.jpg")
def poster(job_id: str, item_id: int):  # type: ignore[no-untyped-def]
    entry = _item_media(job_id, item_id, "video")
    return thumbnail_response(entry, item_id, video=True)


@dashboard.get("/jobs/<job_id>/items/<int:item_id>/<any(audio, text, video):modality>")
def media(job_id: str, item_id: int, modality: str):  # type: ignore[no-untyped-def]
    entry = _item_media(job_id, item_id, modality)
    if modality == "text":
        mimetype = "text/plain; charset=utf-8"
    else:
        guessed = mimetypes.guess_type(entry.get("name") or "")[0] or ""
        kinds = ("audio/", "video/") if entry.get("source") == AUDIO_SOURCE_VIDEO else (
            f"{modality}/",)
        mimetype = guessed if guessed.startswith(kinds) else "application/octet-stream"
    return _send_blob(entry["blob"], mimetype,
                      f"the {modality} of item {item_id} is no longer stored")


def _send_blob(digest: str, mimetype: str, missing: str):  # type: ignore[no-untyped-def]
    """The blob as a cacheable response: its own file where the store keeps one on disk (so
    range requests work), else streamed from the store (S3)."""
    blobs = _services().blobs
    try:
        local = blobs.local_file(digest)
        body: Any = local if local is not None else blobs.open(digest)
    except BlobNotFound:
        raise ApiError(404, "not_found", missing)
    response = send_file(body, mimetype=mimetype, conditional=True, etag=digest)
    response.headers["Cache-Control"] = "private, max-age=86400"
    return response


@dashboard.get("/jobs/<job_id>/export.<fmt>")
def export(job_id: str, fmt: str):  # type: ignore[no-untyped-def]
    if fmt not in EXPORTS:
        raise ApiError(404, "not_found", f"exports are {', '.join(EXPORTS)}")
    with _services().db.session() as s:
        job = service.get_job_or_404(s, job_id)
    return stream_export(_services().db, job, fmt, False)


# --- models -------------------------------------------------------------------------------------

@dashboard.get("/models")
def models_page():  # type: ignore[no-untyped-def]
    with _services().db.session() as s:
        models = []
        for m in list_models(s, auth.tenant_id()):
            payload = model_payload(m)
            metrics = m.metrics or {}
            payload["has_confusion"] = bool(metrics.get("confusion_png"))
            # scalars in the table; an aligner's recall per direction in its own table
            payload["metrics"] = {k: v for k, v in payload["metrics"].items()
                                  if k != "confusion_png" and not isinstance(v, (dict, list))}
            validation = metrics.get("validation") if m.kind == "aligner" else None
            payload["recall"] = [{"direction": d, **r} for d, r in sorted(validation.items())
                                 if isinstance(r, dict) and "r@1" in r] \
                if isinstance(validation, dict) else []
            models.append(payload)
    return render_template("dashboard/models.html", models=list(reversed(models)))


@dashboard.get("/models/<int:model_id>/confusion.png")
def confusion(model_id: int):  # type: ignore[no-untyped-def]
    with _services().db.session() as s:
        digest = (service.get_model_or_404(s, model_id).metrics or {}).get("confusion_png")
    if not digest:
        raise ApiError(404, "not_found", f"model version {model_id} has no confusion matrix")
    return _send_blob(digest, "image/png", f"model version {model_id} has no confusion matrix")


@dashboard.post("/models/<int:model_id>/promote")
def promote_model(model_id: int):  # type: ignore[no-untyped-def]
    service.promote_model(_services(), model_id)
    return redirect(url_for("dashboard.models_page"), code=303)
