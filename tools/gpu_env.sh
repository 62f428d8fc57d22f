# Sourced by the tools/gpu_*.sh scripts on the device machine (run from the repo root): installs
# the wheels a run carries in .whl/ (../shared/device/carry-wheels.sh) into /tmp/site, then puts
# /tmp/site and the repo on PYTHONPATH. Without carried wheels only the repo goes there.
if ls .whl/*.whl >/dev/null 2>&1; then
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "warning: the carried wheels in .whl/ did not install; running without them" >&2
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  fi
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
