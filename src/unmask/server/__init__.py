"""The OpenAI-compatible HTTP server and the playground (`unmask serve`). See docs/server.md."""
from .app import ServerConfig, create_app
from .launch import LiveServer, serve

__all__ = ["LiveServer", "ServerConfig", "create_app", "serve"]
