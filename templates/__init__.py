"""Jinja2 pages of the web editor. Kept at the top of the repository; installed as `editor/templates`."""
