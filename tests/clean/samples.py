"""Text the cleaning tests build their inputs from: real sentences in several languages (the
lid.176 model needs a few sentences to be sure), mixed by a seeded generator."""

from __future__ import annotations

import random

SENTENCES = {
    "en": [
        "The city council approved the new budget after a long debate on Tuesday evening.",
        "Researchers found that the river's water quality improved steadily over the last decade.",
        "She walked to the small bakery at the corner of the street to buy fresh bread.",
        "The museum opened a new exhibition about the history of early printing presses.",
        "Most of the students said the library was the quietest place to study for exams.",
        "Engineers tested the bridge for several weeks before it was opened to traffic.",
        "The weather forecast predicts heavy rain in the northern part of the country tomorrow.",
        "He explained that the company would hire more workers to meet the growing demand.",
        "Farmers in the valley grow apples, pears and plums on the gentle hillsides.",
        "The orchestra performed a symphony that had not been played in public for a century.",
        "Local volunteers cleaned the beach and collected more than two hundred bags of litter.",
        "The author wrote her first novel while working as a teacher in a rural school.",
    ],
    "de": [
        "Der Stadtrat hat den neuen Haushalt nach einer langen Debatte am Dienstagabend beschlossen.",
        "Die Forscher stellten fest, dass sich die Wasserqualität des Flusses stetig verbessert hat.",
        "Sie ging zur kleinen Bäckerei an der Straßenecke, um frisches Brot zu kaufen.",
        "Das Museum eröffnete eine neue Ausstellung über die Geschichte der frühen Druckerpressen.",
        "Die meisten Studenten sagten, die Bibliothek sei der ruhigste Ort zum Lernen.",
        "Die Ingenieure prüften die Brücke mehrere Wochen lang, bevor sie freigegeben wurde.",
    ],
    "fr": [
        "Le conseil municipal a approuvé le nouveau budget après un long débat mardi soir.",
        "Les chercheurs ont constaté que la qualité de l'eau de la rivière s'est améliorée.",
        "Elle est allée à la petite boulangerie au coin de la rue pour acheter du pain frais.",
        "Le musée a ouvert une nouvelle exposition sur l'histoire des premières presses.",
        "La plupart des étudiants ont dit que la bibliothèque était l'endroit le plus calme.",
        "Les ingénieurs ont testé le pont pendant plusieurs semaines avant son ouverture.",
    ],
    "es": [
        "El ayuntamiento aprobó el nuevo presupuesto después de un largo debate el martes.",
        "Los investigadores descubrieron que la calidad del agua del río mejoró cada año.",
        "Ella caminó hasta la pequeña panadería de la esquina para comprar pan fresco.",
        "El museo abrió una nueva exposición sobre la historia de las primeras imprentas.",
        "La mayoría de los estudiantes dijo que la biblioteca era el lugar más tranquilo.",
        "Los ingenieros probaron el puente durante varias semanas antes de abrirlo.",
    ],
}


def paragraph(rng: random.Random, lang: str = "en", sentences: int = 4) -> str:
    """One line of `sentences` sentences in `lang`."""
    return " ".join(rng.choice(SENTENCES[lang]) for _ in range(sentences))


def page(rng: random.Random, lang: str = "en", lines: int = 6) -> str:
    """A multi-line document, unique thanks to a numbered closing line."""
    body = [paragraph(rng, lang, rng.randint(2, 4)) for _ in range(lines)]
    body.append(f"{rng.choice(SENTENCES[lang])[:-1]} in {rng.randint(1000, 10**9)} ways.")
    return "\n".join(body)
