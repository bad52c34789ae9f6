"""quill: the core every transport and plugin plugs into."""
