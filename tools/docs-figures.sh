#!/usr/bin/env bash
# Regenerate every figure and table in README.md, docs/ and the packaged model card that comes from the
# bundled model (issue #13: a new bundled model means all of them are redrawn, then looked at).
#
#   tools/docs-figures.sh [STAGE...]        stages: project resnet50 filters atlas evolution occlusion invariance
#                                           correspondence probe eval screenshots (default: all but evolution)
#   RUN=runs/zfnet224-scratch tools/docs-figures.sh evolution eval-curves   (eval-curves also prints the
#                                           snapshot table of tools/snapshot-table.py for the model card)
#   DRY_RUN=1 tools/docs-figures.sh         print the commands only
#
# Run from the repository root with ../shared present and the venv active (or DECONVNET=...). Raw
# outputs go to out/docs-figures/; the figures the docs show are copied into docs/ (and the model card's
# four pictures into deconvnet/assets/model-card/images/, then into docs/images/ so the copy test holds).
# Heavy stages on a 2-core CPU: atlas (a full scan of Imagenette val, ~20-40 min), probe (~30 min).
set -euo pipefail
cd "$(dirname "$0")/.."
DN=${DECONVNET:-deconvnet}
DATA=../shared/data
VAL=$DATA/imagenette-224/val
OUT=out/docs-figures
CARD=deconvnet/assets/model-card/images
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(project resnet50 filters atlas occlusion invariance correspondence probe eval screenshots)

run() { echo "+ $*"; [ -n "${DRY_RUN:-}" ] || "$@"; }
copy() { echo "+ cp $1 $2"; [ -n "${DRY_RUN:-}" ] || cp "$1" "$2"; }

for stage in "${STAGES[@]}"; do
  case $stage in
  project)  # README: the strongest conv5 maps of the cat photo (eyes, nose: what conv5 responds to)
    chelsea=$(python -c "from deconvnet.samples import sample_paths; print(sample_paths(['chelsea'])[0])")
    run "$DN" project "$chelsea" --layer conv5 --top-maps 6 --out "$OUT/project"
    copy "$OUT/project/chelsea-conv5-top6.png" docs/images/project-conv5.png ;;
  resnet50)  # README: a random-weights ResNet-50 (no ImageNet download here), layer3, the three rules
    chelsea=$(python -c "from deconvnet.samples import sample_paths; print(sample_paths(['chelsea'])[0])")
    run mkdir -p "$OUT"
    run python -c "import torch, torchvision; torch.manual_seed(0); torch.save(torchvision.models.resnet50(weights=None).state_dict(), '$OUT/resnet50-random-seed0.pth')"
    run "$DN" project "$chelsea" --weights "$OUT/resnet50-random-seed0.pth" --arch resnet50 --layer layer3 --top-maps 4 --rule all --out "$OUT/resnet50"
    # 256 colours: a third of the size, the same picture to the eye
    run python -c "from PIL import Image; Image.open('$OUT/resnet50/chelsea-layer3-top4-deconvnet-guided-gradient.png').convert('RGB').quantize(256, dither=Image.Dither.NONE).save('docs/images/resnet50-layer3-rules.png', optimize=True)" ;;
  filters)  # model card: the conv1 mosaic; docs/views.md: Fig. 6 with the strongest conv2 projections
    run "$DN" filters --out "$OUT/filters-card"
    copy "$OUT/filters-card/filters.png" "$CARD/conv1-filters.png"
    run "$DN" filters --images "$VAL" --max-images 1000 --out "$OUT/filters"
    copy "$OUT/filters/filters.png" docs/views/filters.png ;;
  atlas)  # docs/views.md: one sheet per layer, 4 random maps, re-rendered from the full scan
    run "$DN" atlas "$VAL" --out "$OUT/atlas"
    run "$DN" atlas "$VAL" --out "$OUT/atlas" --random-maps 4 --seed 1 --per-page 4 --columns 2 --tile 56
    for layer in conv1 conv2 conv3 conv4 conv5; do
      if [ -n "${DRY_RUN:-}" ]; then echo "+ cp $OUT/atlas/$layer/maps-*.png docs/views/atlas-$layer.png"; continue; fi
      sheet=$(ls -t "$OUT/atlas/$layer"/maps-*.png | head -1)
      copy "$sheet" "docs/views/atlas-$layer.png"
    done ;;
  evolution)  # docs/views.md: Fig. 4 from the training run's snapshots; model card: their conv1 filter trend (RUN=...)
    : "${RUN:?set RUN to the training run folder (its snapshots/epoch-*.safetensors)}"
    run "$DN" evolution "$RUN"/snapshots/epoch-*.safetensors --images "$VAL" --max-images 800 --out "$OUT/evolution"
    copy "$OUT/evolution/evolution.png" docs/views/evolution.png
    copy "$OUT/evolution/filter-trend.png" "$CARD/conv1-filter-trend.png" ;;
  eval-curves)  # model card: the run's learning curves and its snapshots' accuracy/filter table (RUN=the run folder)
    : "${RUN:?set RUN to the training run folder}"
    copy "$RUN/curves.png" "$CARD/training-curves-224.png"
    run python tools/snapshot-table.py "$RUN" ;;
  occlusion)  # docs/analyses.md: Fig. 7 on three Imagenette val photos
    for f in n03417042/ILSVRC2012_val_00006922 n02102040/ILSVRC2012_val_00007032 n01440764/ILSVRC2012_val_00017472; do
      run "$DN" occlusion "$VAL/$f.JPEG" --size 42 --stride 7 --check --out docs/analyses
    done ;;
  invariance)  # docs/analyses.md: Fig. 5 on five photos of five classes
    run "$DN" invariance "$VAL"/n02102040/ILSVRC2012_val_00008162.JPEG "$VAL"/n03394916/ILSVRC2012_val_00003620.JPEG \
      "$VAL"/n03417042/ILSVRC2012_val_00006922.JPEG "$VAL"/n03425413/ILSVRC2012_val_00000732.JPEG \
      "$VAL"/n01440764/ILSVRC2012_val_00017472.JPEG \
      --label "English springer" "French horn" "garbage truck" "gas pump" tench --out docs/analyses ;;
  correspondence)  # docs/analyses.md: Table 1
    run "$DN" correspondence --images "$DATA/dogs" --boxes "$DATA/dogs/annotations.json" --draws 10 --seed 0 \
      --out docs/analyses ;;
  probe)  # docs/analyses.md: Table 7 (the from-scratch baseline is a separate, longer run: see analyses.md)
    run "$DN" probe --data "$DATA/imagewoof-224-probe" --layers 1..7 --train-per-class 15,30,60 --seeds 3 \
      --out docs/analyses ;;
  eval)  # model card: both accuracies and the confusion matrix
    run "$DN" eval "$VAL" --out "$OUT/eval"
    copy "$OUT/eval/confusion.png" "$CARD/confusion-imagenette-val.png" ;;
  screenshots)  # README and docs: the explorer, from the real browser tests
    run env DECONVNET_SCREENSHOTS=docs/screenshots python -m pytest -q tests/test_browser.py ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
# the docs site's copy of the model card's pictures (tests/test_packaging.py checks they are identical)
for f in "$CARD"/*.png; do copy "$f" "docs/images/$(basename "$f")"; done
echo "done: now look at every figure, then update the numbers in the texts that describe them"
