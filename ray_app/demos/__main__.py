"""``python -m ray_app.demos``: the chain demo (``ray_app.demos.chain``)."""

from ray_app.demos.chain import main

if __name__ == "__main__":
    main()
