"""HTTP API, metrics and dashboard (FastAPI). ``create_app(settings)`` builds the app;
``pacs_agent.api.server`` runs it (``pacs-agent api``, or a thread of ``serve``)."""
