import torch
from diffusers import StableDiffusionPipeline


def test_tiny_pipeline_runs_and_loads_offline(tiny_model_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, local_files_only=True, safety_checker=None)
    out = pipe("a photo of a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 16, 16, 3)
    assert pipe.tokenizer("*").input_ids == [49406, 265, 49407]
