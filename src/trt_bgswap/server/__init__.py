"""The appliance server: models loaded once, HTTP requests through a bounded queue and a dynamic batcher.

``create_app(ServerConfig)`` (:mod:`.app`) is the ASGI application; ``trt-bgswap serve`` runs it
under uvicorn, ``trt-bgswap serve --ray`` as a Ray Serve deployment (:mod:`.ray_app`). Needs the
``serve`` extra (``pip install 'trt-bgswap[serve]'``).
"""
