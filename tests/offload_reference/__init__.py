"""The offloader's policies and cache as of commit fb8f032 (before the host-time work on the activation policy),
verbatim but for absolute imports of the modules that did not change. ``tests/test_offload_decisions.py`` runs the
same routing through this and the current code and requires the same decisions (every copy issued, in order, and
the same outputs and statistics)."""
