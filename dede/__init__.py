"""dede's torch-free client side: `dede.client` talks to a running service (httpx only)."""
