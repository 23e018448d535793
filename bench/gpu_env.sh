# Source this on a GPU machine that has torch/triton/transformers but no diffusers and no network (the lent
# device): installs the carried wheels in .whl/ (diffusers 0.42.1, importlib_metadata) into /tmp/site and lays the
# package out as pyproject.toml installs it (kernels/, eval/, bench/ inside hyperquant_diffusers) under /tmp/pkg.
#   . bench/gpu_env.sh && (cd /tmp/pkg && python -m pytest -q tests/test_kernels.py)
set -e
pip install -q --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1 || pip install --no-deps --target /tmp/site .whl/*.whl
rm -rf /tmp/pkg && mkdir -p /tmp/pkg
cp -r hyperquant_diffusers /tmp/pkg/
for d in kernels eval bench; do rm -rf /tmp/pkg/hyperquant_diffusers/$d; cp -r $d /tmp/pkg/hyperquant_diffusers/$d; done
cp -r tests pyproject.toml /tmp/pkg/   # run tests from /tmp/pkg so the repo's own (unmapped) folders never shadow it
export PYTHONPATH=/tmp/pkg:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
set +e
