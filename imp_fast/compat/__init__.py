"""Drop-in replacements for other libraries' solver APIs (see ``compat.torchdeq``)."""
