"""Dev tooling: ``devstack`` (embedded broker + redis-server), ``demo``, ``chaos`` drills,
``spawn`` (the one CLI-subprocess helper) and ``bench``. The product never imports it.
"""
