"""Sections of the settings, grouped by the room that reads them.

:mod:`pipeline.config` composes them into :class:`~pipeline.config.Settings` and loads them;
callers import the root and the loader from there. Torch-free, like the rest of the settings.
"""
