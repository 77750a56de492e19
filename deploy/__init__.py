"""Scale-out beyond one machine on an existing engine: Ray Serve (ray_app.py, serve_config.yaml)."""
