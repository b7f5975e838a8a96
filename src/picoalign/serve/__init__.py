"""`picoalign serve`: the HTTP API and the chat page, built by `serve.app.create_app(config)`."""
