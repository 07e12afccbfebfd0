"""Images into the cache: sources (Glance, URLs), admission, fetching, instance overlays."""
