"""Side-by-side runs against PyTorch. Never imported by jaxres itself."""
