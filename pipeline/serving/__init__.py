"""Serving: the model leaves the learner as a versioned bundle.

``bundle`` (the on-disk format: safetensors weights + JSON manifest, content digest),
``registry`` (versioned folders, atomic publication, keep the last K), ``predictor``
(``Predictor.load(dir).predict(features)``), ``announce`` (the ``<prefix>.models`` payload),
``scoring`` (``supcon-stream predict`` over a file) and ``serve`` (the serving consumer with
hot reload). ``bundle``, ``registry``, ``predictor`` and ``announce`` import no Kafka and no
Redis, so a downstream service can use a bundle with torch, numpy and safetensors alone.
"""
