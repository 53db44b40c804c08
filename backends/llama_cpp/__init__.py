"""Local GGUF models through llama-cpp-python, each in its own worker process.

``backend`` is what the daemon loads (entry point ``llama_cpp``); ``worker`` is the
process that runs the engine. This package's own import is kept empty, because
every worker start imports it first, and each millisecond here is one more
millisecond of a cold start.
"""
