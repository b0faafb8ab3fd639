"""The loopback Hub (tests/hub_server.py) driven through the real huggingface_hub / transformers clients."""

import os

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hub_server import local_hub_fixture

hub = local_hub_fixture()


@pytest.fixture(autouse=True)
def _no_server_surprises(hub):
    yield
    # Every call the clients made must hit an implemented route, and no route may have crashed
    assert hub.state.unhandled == []
    assert hub.state.errors == []


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    return LlamaForCausalLM(config).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate("hello world from the local hub".split())}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


def logits(model, ids=torch.arange(16).reshape(2, 8)):
    with torch.no_grad():
        return model(ids).logits


def test_push_to_hub_then_from_pretrained_roundtrips(hub):
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    model.push_to_hub("user/tiny")
    tokenizer.push_to_hub("user/tiny")

    loaded = AutoModelForCausalLM.from_pretrained("user/tiny")
    assert torch.equal(logits(model), logits(loaded))
    text = "hello local world unknown"
    assert AutoTokenizer.from_pretrained("user/tiny")(text)["input_ids"] == tokenizer(text)["input_ids"]
    # Weights went through the LFS-style redirect to the "CDN" host
    assert any(path.startswith("/__lfs/") for _, path, _ in hub.state.requests)


def test_hf_hub_download_and_snapshot_download(hub, tmp_path):
    api = HfApi()
    assert api.whoami()["name"] == hub.user
    api.create_repo("user/data", repo_type="dataset")
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub" / "b.bin").write_bytes(bytes(range(256)))  # *.bin: served as an LFS file
    api.upload_folder(folder_path=tmp_path, repo_id="user/data", repo_type="dataset")
    api.upload_file(path_or_fileobj=b"gamma", path_in_repo="sub/c.txt", repo_id="user/data", repo_type="dataset")
    api.create_repo("user/card")  # ModelCard.push_to_hub commits to an existing repo
    ModelCard("---\nlicense: mit\n---\n# Tiny\n").push_to_hub("user/card")

    path = hf_hub_download("user/data", "sub/b.bin", repo_type="dataset")
    assert open(path, "rb").read() == bytes(range(256))
    snapshot = snapshot_download("user/data", repo_type="dataset")
    files = {os.path.relpath(os.path.join(d, f), snapshot) for d, _, fs in os.walk(snapshot) for f in fs}
    assert files == {".gitattributes", "a.txt", "sub/b.bin", "sub/c.txt"}
    assert open(os.path.join(snapshot, "sub", "c.txt")).read() == "gamma"
    assert sorted(api.list_repo_files("user/data", repo_type="dataset")) == sorted(files)
    assert ModelCard.load("user/card").data.license == "mit"


def test_offline_loading_from_cache(hub):
    model = tiny_llama()
    model.push_to_hub("user/tiny")
    AutoModelForCausalLM.from_pretrained("user/tiny")  # fills the cache
    snapshot = snapshot_download("user/tiny")

    seen = len(hub.state.requests)
    with hub.offline():
        loaded = AutoModelForCausalLM.from_pretrained("user/tiny")
        assert snapshot_download("user/tiny") == snapshot
    assert torch.equal(logits(model), logits(loaded))
    assert len(hub.state.requests) == seen  # nothing reached the server


def test_missing_repo_file_and_revision_raise_hub_errors(hub):
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/nope", "config.json")
    with pytest.raises(RepositoryNotFoundError):  # anonymous: the Hub answers 401 + RepoNotFound
        hf_hub_download("user/nope", "config.json", token=False)
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("user/nope")

    HfApi().create_repo("user/empty")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("user/empty", "adapter_config.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("user/empty", ".gitattributes", revision="v9")
    with pytest.raises(HfHubHTTPError) as bad_token:
        HfApi().model_info("user/empty", token="hf_wrong")
    assert not isinstance(bad_token.value, RepositoryNotFoundError)
    assert bad_token.value.response.status_code == 401


def test_second_commit_changes_revision_and_content(hub):
    api = HfApi()
    api.create_repo("user/versions")
    first = api.upload_file(path_or_fileobj=b"v1", path_in_repo="w.txt", repo_id="user/versions").oid
    assert open(hf_hub_download("user/versions", "w.txt")).read() == "v1"

    second = api.upload_file(path_or_fileobj=b"v2", path_in_repo="w.txt", repo_id="user/versions").oid
    assert second != first and api.model_info("user/versions").sha == second
    assert open(hf_hub_download("user/versions", "w.txt")).read() == "v2"
    assert open(hf_hub_download("user/versions", "w.txt", revision=first)).read() == "v1"

    # Unchanged content: the client sees the same oid in preupload and makes no commit
    assert api.upload_file(path_or_fileobj=b"v2", path_in_repo="w.txt", repo_id="user/versions").oid == second
    assert len(api.list_repo_commits("user/versions")) == 3  # initial commit + 2
