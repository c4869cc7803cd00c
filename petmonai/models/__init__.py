"""Models: the registry of networks petmonai trains (3D SFCN, 3D/2D ResNet-18) and their facts."""

from petmonai.models.checkpoints import (  # noqa: F401
    load_weights,
)
from petmonai.models.registry import (  # noqa: F401
    MODEL_FACTS,
    MODELS,
    SFCN,
    AxialSlices2D,
    ModelFacts,
    build_model,
    count_parameters,
    model_facts,
    model_label,
    register,
    resnet18_2d,
    resnet18_2d_slices,
    resnet18_3d,
    saliency_layer,
    sfcn_3d,
    spatial_dims,
)
