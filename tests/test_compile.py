"""--compile: a compiled pre-training step computes what the eager step computes (inductor on CPU)."""
import copy

import torch

from maskalign.teacher_weights import build_teacher
from models_maskalign import create_maskalign
from util.compile import CompileWatch, compile_in_place


def tiny_model():
    teacher = build_teacher("timm:vit_tiny_patch16_224", 32, 16, weights="none", depth=2, embed_dim=32, num_heads=2,
                            img_size=32)
    torch.manual_seed(0)
    return create_maskalign("tiny", teacher=teacher, img_size=32, embed_dim=32, depth=1, num_heads=2, top_k=1,
                            drop_path_rate=0.1)


def step(model, images, seed):
    """Loss and gradients of one training step; attentive masking and drop path draw from `seed`."""
    torch.manual_seed(seed)
    loss = model(images)[0]
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_compiled_step_matches_eager_without_graph_breaks_or_recompiles():
    eager = tiny_model()
    compiled = copy.deepcopy(eager)
    watch = compile_in_place(compiled)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    breaks_before = CompileWatch.graph_breaks()
    for seed in (1, 2):  # the first call compiles (warm-up); the second must reuse the graph
        loss, grads = step(eager, images, seed)
        compiled_loss, compiled_grads = step(compiled, images, seed)
        torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-6)
        assert compiled_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
        if seed == 1:
            watch.mark_warm()
    assert CompileWatch.graph_breaks() == breaks_before
    assert watch.recompiles() == 0
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # compiled in place: names unchanged


def test_compile_flag_compiles_the_model_in_both_entry_points(data_dir, tmp_path, teacher_file, monkeypatch):
    """--compile reaches engine.fit, which compiles the task's model in place before wrapping it (the compiled
    numbers themselves are the test above; here only the wiring, without paying for a compilation)."""
    from tiny import pretrain_argv

    import engine
    import main_finetune
    import main_pretrain

    compiled = []
    monkeypatch.setattr(engine, "compile_in_place",
                        lambda model: compiled.append(type(model).__name__) or CompileWatch())
    assert main_finetune.parse_args(["--compile", "--device", "cpu"]).compile
    assert main_pretrain.run(pretrain_argv(data_dir, tmp_path, teacher_file, "--compile", "--epochs", "1")) == 0
    assert compiled == ["MaskAlignViT"]
