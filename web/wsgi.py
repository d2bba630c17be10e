"""Entry point for ``gunicorn web.wsgi:app``: the one module that builds the app at import."""

from web.app import create_app

app = create_app()
