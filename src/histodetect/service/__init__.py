"""Service layer: the FastAPI app, micro-batching, request guards and the offline web page."""
