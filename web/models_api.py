"""The model versions API under /api/v1/models: list, one version, promote, its confusion-matrix
PNG, and evaluation on a new labelled archive (a classify job whose ``evaluation`` link scores
it: ``/api/v1/jobs/<id>/evaluation``)."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify, request, url_for

from store.registry import list_models
from web import auth, service
from web.api import job_response
from web.errors import ApiError
from web.serializers import model_payload

models_api = Blueprint("models_api", __name__)
models_api.before_request(auth.authenticate)


def _services() -> service.Services:
    return current_app.extensions["mmbatch"]  # type: ignore[no-any-return]


@models_api.get("/api/v1/models")
def get_models():  # type: ignore[no-untyped-def]
    with _services().db.session() as s:
        return jsonify({"models": [model_payload(m) for m in list_models(s, auth.tenant_id())]})


@models_api.get("/api/v1/models/<int:model_id>")
def get_model_version(model_id: int):  # type: ignore[no-untyped-def]
    with _services().db.session() as s:
        return jsonify(model_payload(service.get_model_or_404(s, model_id), full=True))


@models_api.post("/api/v1/models/<int:model_id>/promote")
def promote_model(model_id: int):  # type: ignore[no-untyped-def]
    """Make this version the tenant's default model of its kind (one its promotion gate kept a
    candidate records that the gate was overridden)."""
    model = service.promote_model(_services(), model_id)
    return jsonify(model_payload(model, full=True))


@models_api.get("/api/v1/models/<int:model_id>/confusion.png")
def confusion_png(model_id: int):  # type: ignore[no-untyped-def]
    """The validation confusion matrix rendered when the model was trained."""
    with _services().db.session() as s:
        digest = (service.get_model_or_404(s, model_id).metrics or {}).get("confusion_png")
    if not digest:
        raise ApiError(404, "not_found", f"model version {model_id} has no confusion matrix "
                                         "(trained without a validation split)")
    return Response(_services().blobs.read(digest), mimetype="image/png",
                    headers={"Cache-Control": "private, max-age=86400"})


@models_api.post("/api/v1/models/<int:model_id>/evaluate")
def evaluate_model(model_id: int):  # type: ignore[no-untyped-def]
    """Classify a labelled archive with this model; the job's ``evaluation`` link scores it."""
    job_id = service.evaluate_model(_services(), model_id, request.files.get("archive"))
    return job_response(job_id, evaluation=url_for("api.job_evaluation", job_id=job_id))
