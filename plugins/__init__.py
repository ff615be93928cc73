"""The engine's built-in plugins, each registered through the `engine.plugins` entry-point group."""
