"""HTTP API: FastAPI routers, thin over the jobs, store and catalog layers."""
