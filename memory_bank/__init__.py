"""Memory bank of past examples: durable in Redis, mirrored in-process, indexed by FAISS."""
