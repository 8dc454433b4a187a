"""ICNet models: backbones (cascade encoders), the ICNet network and its named configurations."""
from .icnet import (MODEL_CONFIGS, CascadeLogits, ICNet, ICNetConfig, build_encoder, build_icnet,
                    count_parameters)
from .resnet import ResNetV1c

__all__ = ["MODEL_CONFIGS", "CascadeLogits", "ICNet", "ICNetConfig", "ResNetV1c", "build_encoder", "build_icnet",
           "count_parameters"]
