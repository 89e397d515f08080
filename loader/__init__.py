"""tritonmoe.loader: the loading-optimised checkpoint format (format, layout), its converter (convert,
hf_source), its reader (direct_io, reader) and transformers model loading (hf_model). docs/loader.md specifies it."""
