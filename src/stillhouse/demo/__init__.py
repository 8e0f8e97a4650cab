"""The bundled demo: verifiable instruction tasks and a tiny teacher trained on them."""
