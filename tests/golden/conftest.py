"""The generated image tree of the vision tests, for the ViT golden runs."""
from tests.vision.conftest import image_root  # noqa: F401
