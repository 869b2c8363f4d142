"""Head and loss registries, the one source of the recipes, heads and losses as objects."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import draw_image_folder
from utils_cv.similarity import checkpoint, data, experiment, features, heads, train


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return data.list_images(draw_image_folder(tmp_path_factory.mktemp("heads") / "images", per_class=8))


def _contrastive(n_classes, embedding_dim):
    """A tiny pair loss on embeddings: same class pulled together, others pushed apart."""

    def loss(z, y):
        z = F.normalize(z, dim=1)
        sim = z @ z.T
        same = (y[:, None] == y[None]).float() - torch.eye(len(y))
        other = (y[:, None] != y[None]).float()
        pull = ((1 - sim) * same).sum() / same.sum().clamp(min=1)
        return pull + (F.relu(sim - 0.2) * other).sum() / other.sum().clamp(min=1)

    return loss


def _embedding_head(width, n_classes, *, embedding_dim=None, temperature=0.05, dropout=0.2):
    dim = embedding_dim or 16
    return heads.HeadParts(nn.Linear(width, dim), nn.Identity(), embedding_dim=dim, normalize=True,
                           loss="test_contrastive", logits=False)


@pytest.fixture
def registered():
    heads.register_loss("test_contrastive")(_contrastive)
    heads.register_head("test_embedding")(_embedding_head)
    yield
    heads.HEADS.pop("test_embedding")
    heads.LOSSES.pop("test_contrastive")


def _learner(folder, **kw):
    paths, labels = folder
    return train.create_learner(paths, labels, **{**dict(pretrained=False, image_size=64, batch_size=8, valid=0.25,
                                                         augment=False, validate_every_epoch=False), **kw})


def test_a_new_head_and_loss_are_one_registry_entry_each(folder, registered, tmp_path):
    learn = _learner(folder, head="test_embedding", pretrained=True)
    assert learn.model.head_name == "test_embedding" and learn.metrics == []  # no logits: no accuracy
    with learn.no_bar():
        before = learn.validate(ds_idx=0)[0]
        train.fine_tune(learn, 2, lr=1e-2, freeze_epochs=0, progress=False)
        after = learn.validate(ds_idx=0)[0]
    assert after < before
    m, tf = train.embedding_model(learn)
    paths, _ = folder
    z = features.extract_features(m, paths[:3], tf, progress=False)
    assert z.shape == (3, 16)
    saved = checkpoint.save(learn, tmp_path / "model.pth")  # registered heads save and load like the built-ins
    m2, tf2 = checkpoint.load(saved)
    assert m2.metadata["head"] == "test_embedding" and m2.num_features == 16
    torch.testing.assert_close(torch.from_numpy(features.extract_features(m2, paths[:3], tf2, progress=False)),
                               torch.from_numpy(z))


class _Proxies(nn.Module):
    """A loss with parameters (one proxy per class), as ArcFace or ProxyAnchor have."""

    def __init__(self, n_classes, dim):
        super().__init__()
        self.proxies = nn.Parameter(torch.randn(n_classes, dim))

    def forward(self, z, y):
        return F.cross_entropy(F.normalize(z, dim=1) @ F.normalize(self.proxies, dim=1).T / 0.1, y)


def test_heads_and_losses_can_be_passed_as_objects(folder):
    torch.manual_seed(0)
    loss = _Proxies(3, 16)
    start = loss.proxies.detach().clone()
    learn = _learner(folder, head=_embedding_head, loss=loss)
    assert learn.loss_func is loss and learn.model.head_name == "_embedding_head"
    train.fine_tune(learn, 1, lr=1e-2, freeze_epochs=0, progress=False)
    assert not torch.equal(loss.proxies.detach(), start), "the loss's parameters train with the head"
    ce = _learner(folder, loss=nn.CrossEntropyLoss())
    assert isinstance(ce.loss_func, nn.CrossEntropyLoss) and ce.metrics  # a classifier head: accuracy reported


def test_unknown_or_duplicate_names_are_refused(folder):
    paths, labels = folder
    with pytest.raises(ValueError, match=r"'head' parameter must be one of \['metric', 'normsoftmax', 'softmax'"):
        train.create_learner(paths, labels, head="arcface", pretrained=False)
    with pytest.raises(ValueError, match="'loss' parameter must be one of"):
        train.create_learner(paths, labels, loss="lifted_structure", pretrained=False)
    with pytest.raises(ValueError, match="already registered"):
        heads.register_head("softmax")(_embedding_head)
    with pytest.raises(TypeError, match="must return heads.HeadParts"):
        _learner(folder, head=lambda width, n_classes, **kw: nn.Linear(width, n_classes))


def test_built_in_heads_keep_their_layout(folder):
    soft, norm = _learner(folder), _learner(folder, head="normsoftmax", embedding_dim=32)
    assert {k.split(".")[0] for k in soft.model.state_dict()} == {"body", "classifier"}
    assert list(norm.model.state_dict())[-3:] == ["neck.1.weight", "neck.1.bias", "classifier.weight"]
    assert soft.model.embedding_dim == soft.model.body.feature_dim and not soft.model.normalize
    assert norm.model.embedding_dim == 32 and norm.model.normalize and norm.model.balanced_batches


def test_recipes_have_one_source(folder):
    assert experiment.RECIPES is heads.RECIPES
    with pytest.raises(TypeError):
        heads.RECIPES["softmax"]["lr"] = 1.0  # read-only: copy an entry to vary it
    paths, labels = folder
    learn = train.create_learner(paths, labels, pretrained=False, validate_every_epoch=False)  # recipe defaults
    assert learn.model.config["image_size"] == heads.RECIPES["softmax"]["image_size"] == 160
    assert learn.model.config["backbone"] == heads.RECIPES["softmax"]["backbone"]
    norm = train.create_learner(paths, labels, head="normsoftmax", pretrained=False, validate_every_epoch=False)
    assert norm.model.embedding_dim == heads.RECIPES["normsoftmax"]["embedding_dim"]
    assert heads.recipe("unregistered-or-custom") == dict(heads.RECIPES["softmax"])
