"""The Flask API. Build it with ``web.app.create_app(settings)``."""
