"""GLEAM-X examples: a query view and a satellite image, the question "the same place?", and the
answer: a verdict and an explanation, in English or Chinese.

On the synthetic world the answer is written from what the world knows of both places (`place_facts`:
the city's archetype, the street the camera stands on, the buildings, water, green and fields within
the satellite's footprint), so every explanation is true of the images it speaks of:

    Yes. Both views show a downtown district around a main road, with dense buildings up to 42 m and a river.
    No. The drone view shows a suburb with open fields, while the satellite image shows an old town with a plaza.

A matching pair is a record's query with its own satellite; a non-matching one takes the satellite of
another location: with probability `hard_negatives` one of the same city (the same archetype and
palette: only the layout tells them apart), else one of another city. `examples(data_cfg, split, n,
seed)` draws them, seeded, from the built synthetic_cvgl dataset.
"""
import numpy as np

from gleam_jax.data import sources
from gleam_jax.data.config import world_overrides
from gleam_jax.data.synthetic import city as city_lib
from gleam_jax.data.synthetic import render, spec as spec_lib
from gleam_jax.errors import GleamError

LANGS = ("en", "zh")

# GLEAM-X's question: the same place or not, then the evidence.
QUESTIONS = {
  "en": ("Do these two images show the same place? Answer yes or no first, then explain which "
         "landmarks, layout and structures agree or differ between the two views."),
  "zh": "这两张图像拍摄的是同一个地点吗？请先回答是或否，然后说明两个视角之间哪些地标、布局和建筑一致或不同。",
}
# Asked when the query is a drone flight, a video (its frames) before the satellite image.
FLIGHT_QUESTIONS = {
  "en": ("Does this drone video show the place in the satellite image? Answer yes or no first, then explain "
         "which landmarks, layout and structures agree or differ between the two views."),
  "zh": "这段无人机视频拍摄的是卫星图像中的地点吗？请先回答是或否，然后说明两个视角之间哪些地标、布局和建筑一致或不同。",
}
FLIGHT = "flight"  # the modality name of a drone flight given as a video
VERDICTS = {"en": ("Yes.", "No."), "zh": ("是。", "否。")}  # (match, no match): how every answer starts

ARCHETYPE_WORDS = {
  "downtown": ("a downtown district", "市中心街区"), "suburb": ("a suburb", "郊区住宅区"),
  "oldtown": ("an old town", "老城区"), "industrial": ("an industrial estate", "工业区"),
  "garden": ("a garden city", "花园城区"),
}
STREET_WORDS = {
  city_lib.FOOTPATH: ("a footpath", "步行小路"), city_lib.RESIDENTIAL: ("a residential street", "居民区街道"),
  city_lib.PRIMARY: ("a main road", "主干道"), city_lib.PLAZA: ("a plaza", "广场"),
}
MODALITY_WORDS = {"uav": ("drone", "无人机"), "streetmap": ("street map", "街道地图"),
                  "panorama": ("panorama", "全景"), "ground": ("ground photo", "地面照片")}
# how an answer names the query: "the drone view", "the drone video" (a flight)
VIEW_WORDS = {**{m: (f"{en} view", f"{zh}视角") for m, (en, zh) in MODALITY_WORDS.items()},
              FLIGHT: ("drone video", "无人机视频")}
FEATURE_ORDER = ("buildings", "water", "green", "fields", "motorway")


def place_facts(spec, location_id):
  """What a location's satellite footprint holds: {'archetype', 'street' (the class the camera
  stands on), 'buildings' ('dense' | 'sparse' | None, with 'tallest_m'), 'water', 'green',
  'fields', 'motorway' (bools)}."""
  city, scene = render.location_scene(spec, int(location_id))
  half = int(spec.footprint_m / 2)
  window = (slice(max(scene.i0 - half, 0), scene.i0 + half), slice(max(scene.j0 - half, 0), scene.j0 + half))
  cls, height = city.cls[window], city.height[window]
  share = lambda *classes: float(np.isin(cls, classes).mean())
  built = share(city_lib.BUILDING)
  tallest = float(height[cls == city_lib.BUILDING].max()) if built > 0 else 0.0
  return {
    "archetype": city.style.archetype,
    "street": int(city.cls[scene.i0, scene.j0]),
    "buildings": "dense" if built > 0.25 else "sparse" if built > 0.02 else None,
    "tallest_m": int(round(tallest)),
    "water": share(city_lib.WATER) > 0.02,
    "green": share(city_lib.PARK, city_lib.TREE) > 0.15,
    "fields": share(city_lib.FIELD) > 0.15,
    "motorway": share(city_lib.MOTORWAY) > 0.01,
  }


def _feature_words(facts, name, lang):
  zh = lang == "zh"
  if name == "buildings":
    if facts["buildings"] == "dense":
      return f"高达{facts['tallest_m']}米的密集建筑" if zh else f"dense buildings up to {facts['tallest_m']} m"
    if facts["buildings"] == "sparse":
      return "零散的低矮建筑" if zh else "scattered low buildings"
    return "极少的建筑" if zh else "almost no buildings"
  if not facts[name]:
    return None
  return {"water": ("a river", "一条河流"), "green": ("parks and trees", "公园和树木"),
          "fields": ("open fields", "开阔的农田"), "motorway": ("a motorway", "一条高速公路")}[name][zh]


def _features(facts, names, lang):
  words = [w for w in (_feature_words(facts, n, lang) for n in names) if w]
  if not words:
    return ""
  if lang == "zh":
    return "、".join(words)
  return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def answer(match, query_facts, satellite_facts, modality, lang):
  """The verdict and its explanation for a query (of `modality`) and a satellite with these facts."""
  if lang not in LANGS:
    raise GleamError(f"GLEAM-X answers are written in {', '.join(LANGS)}, not {lang!r}.")
  zh = lang == "zh"
  verdict = VERDICTS[lang][0 if match else 1]
  q_place = ARCHETYPE_WORDS[query_facts["archetype"]][zh]
  if match:
    street = STREET_WORDS.get(query_facts["street"], STREET_WORDS[city_lib.RESIDENTIAL])[zh]
    features = _features(query_facts, FEATURE_ORDER, lang)
    if zh:
      return f"{verdict}两个视角都显示{street}周围的{q_place}，有{features}。"
    return f"{verdict} Both views show {q_place} around {street}, with {features}."
  s_place = ARCHETYPE_WORDS[satellite_facts["archetype"]][zh]
  differ = [n for n in FEATURE_ORDER if _feature_words(query_facts, n, lang) != _feature_words(satellite_facts, n, lang)]
  view = VIEW_WORDS[modality][zh]
  if not differ:  # the same kind of place: the layout tells them apart
    if zh:
      return f"{verdict}两者都是{q_place}，但{view}中的道路布局和建筑形状与卫星图像不一致。"
    return (f"{verdict} Both show {q_place}, but the road layout and building shapes of the {view} "
            "do not match the satellite image.")
  q, s = _features(query_facts, differ, lang), _features(satellite_facts, differ, lang)
  if zh:
    q, s = (f"有{q}" if q else f"没有{s}"), (f"有{s}" if s else f"没有{q}")
    return f"{verdict}{view}显示{q_place}，{q}；而卫星图像显示{s_place}，{s}。"
  q, s = (f"with {q}" if q else f"without {s}"), (f"with {s}" if s else f"without {q}")
  return f"{verdict} The {view} shows {q_place} {q}, while the satellite image shows {s_place} {s}."


def world_spec(data_cfg):
  if data_cfg.name != "synthetic_cvgl":
    raise GleamError(f"GLEAM-X examples are written from the synthetic world's facts; data.name="
                     f"{data_cfg.name!r} records none: use data.name='synthetic_cvgl'.")
  return spec_lib.spec_from_name(data_cfg.config, **world_overrides(data_cfg))


def flight_frames(source, index, location_id):
  """A location's drone views in view order: its flight, the frames of a video."""
  rows = np.flatnonzero((index["location_id"] == location_id) & (index["modality"] == spec_lib.MODALITIES.index("uav")))
  return [source[int(r)]["query"] for r in rows[np.argsort(index["view_index"][rows], kind="stable")]]


def examples(data_cfg, split, n, seed, modalities=None, langs=LANGS, hard_negatives=0.5, flights=0.0,
             negatives=None):
  """`n` examples of `split`: dicts of 'query', 'satellite' (uint8 images), 'match', 'lang',
  'modality', 'question', 'answer', 'location_id', 'satellite_location_id'. Half match (alternating),
  languages and query records are drawn with `seed`. A share `flights` of the drone examples ask about
  the location's whole flight instead of one view: 'query' is the list of its views (`flight_frames`,
  a video's frames) and 'modality' is FLIGHT. `negatives` ({record index: location ids}, e.g. GLEAM-C's
  confusions, `retrieve.confusions`): a non-matching pair's satellite is drawn from its query's
  candidates instead (`hard_negatives` then unused)."""
  spec = world_spec(data_cfg)
  source = sources.get_source(data_cfg, split)
  index = sources.index_of(source)
  modalities = tuple(modalities or data_cfg.modalities)
  names = np.asarray(spec_lib.MODALITIES)[index["modality"]]
  rows = np.flatnonzero(np.isin(names, modalities) & index["is_query"])
  if len(rows) == 0:
    raise GleamError(f"split {split!r} of {source.name} has no queries of modalities {modalities}.")
  locations = np.unique(index["location_id"][rows])
  if len(locations) < 2:
    raise GleamError(f"split {split!r} of {source.name} has one location: a non-matching pair needs two.")
  rng, flight_rng = np.random.default_rng([int(seed), 11]), np.random.default_rng([int(seed), 12])
  facts, out = {}, []
  for k in range(int(n)):
    r = int(rng.choice(rows))
    record = source[r]
    match = k % 2 == 0
    loc = record["location_id"]
    if match:
      other, satellite = loc, record["satellite"]
    elif negatives is not None:
      other = int(rng.choice([c for c in negatives[r] if c != loc]))
      satellite = source.image(int(np.flatnonzero(index["location_id"] == other)[0]), "satellite")
    else:
      same = index["city_id"][rows] == record["city_id"]
      hard = rng.random() < hard_negatives
      pool = rows[(same if hard else ~same) & (index["location_id"][rows] != loc)]
      if len(pool) == 0:  # a split of one city, or of one location per city
        pool = rows[index["location_id"][rows] != loc]
      o = int(rng.choice(pool))
      other, satellite = int(index["location_id"][o]), source.image(o, "satellite")
    lang = langs[int(rng.integers(len(langs)))]
    for location in (loc, other):
      if location not in facts:
        facts[location] = place_facts(spec, location)
    query, modality, question = record["query"], record["modality_name"], QUESTIONS[lang]
    if modality == "uav" and flight_rng.random() < flights:  # its own stream: the same draws as without flights
      query, modality, question = flight_frames(source, index, loc), FLIGHT, FLIGHT_QUESTIONS[lang]
    out.append(dict(query=query, satellite=satellite, match=match, lang=lang, modality=modality, question=question,
                    answer=answer(match, facts[loc], facts[other], modality, lang),
                    location_id=loc, satellite_location_id=other))
  return out


def job_split(config, which):
  """The split a GLEAM-X job draws its 'train' or 'eval' pairs from."""
  return config.data.train_split if which == "train" else config.examples.eval_split


def job_examples(config, which, negatives=None):
  """A GLEAM-X job's synthetic draw: `which` 'train' (`examples.train` pairs of the training split,
  seeded with the job's seed) or 'eval' (`examples.eval` held-out pairs of `examples.eval_split`).
  A job with `examples.negatives_from` takes `negatives` (`retrieve.confusions` of that split)."""
  ex = config.examples
  if ex.get("negatives_from") and negatives is None:
    raise GleamError(f"config.examples.negatives_from={ex.negatives_from}: draw the pairs with GLEAM-C's "
                     "confusions (train.sft.load_examples mines them).")
  n, seed = (ex.train, config.seed) if which == "train" else (ex.eval, int(config.seed) + 1)
  return examples(config.data, job_split(config, which), int(n), int(seed), langs=tuple(ex.langs),
                  hard_negatives=float(ex.hard_negatives), flights=float(ex.get("flights", 0.0)),
                  negatives=negatives)


def corpus(langs=LANGS, flights=False):
  """Sentences of every kind of answer and the questions (with `flights`, those about drone flights too):
  what a tokenizer trained for a tiny GLEAM-X model must encode compactly."""
  facts = [dict(archetype=a, street=s, buildings=b, tallest_m=t, water=w, green=g, fields=f, motorway=m)
           for a in ARCHETYPE_WORDS for s in STREET_WORDS
           for b, t, w, g, f, m in (("dense", 42, True, True, False, True), ("sparse", 9, False, False, True, False),
                                    (None, 0, True, False, False, False))]
  lines = [QUESTIONS[lang] for lang in langs]
  for i, q in enumerate(facts):
    s = facts[(i * 7 + 3) % len(facts)]
    for lang in langs:
      modality = spec_lib.MODALITIES[i % len(spec_lib.MODALITIES)]
      lines += [answer(True, q, q, modality, lang), answer(False, q, s, modality, lang)]
      if flights:
        lines.append(answer(False, q, s, FLIGHT, lang))
  return lines + ([FLIGHT_QUESTIONS[lang] for lang in langs] if flights else [])
