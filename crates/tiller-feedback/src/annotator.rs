//! Simulated annotators: people with slightly different tastes, derived from the gold evaluator.
//!
//! An annotator's utility for an image is a weighted sum of the evaluator's factor scores, each in
//! [0, 1] (a factor the prompt does not constrain counts as met), normalised by the weights' sum:
//!
//! ```text
//! u(image, prompt) = sum_k w_k * s_k / sum_k w_k          in [0, 1]
//! ```
//!
//! Each annotator's weights are drawn around [`TasteWeights::default`] as
//! `w_k = default_k * exp(spread * z_k)`, `z_k ~ N(0, 1)` (log-normal, median = the default), so
//! people disagree on how much a blurred edge matters against a wrong colour. Queries:
//!
//! - **Comparisons** follow Bradley–Terry (Bradley & Terry 1952; the choice model of Pick-a-Pic,
//!   HPDv2 and DPO): `P(A > B) = sigmoid((u_A - u_B) / temperature)`. When
//!   `|u_A - u_B| < tie_margin` the annotator cannot tell and answers a tie. A non-tie answer is then
//!   flipped with probability `flip_rate` (lapses: a misclick, a glance).
//! - **Ratings**: `u + rating_noise * N(0, 1)` thresholded at `rating_thresholds` into 1–5 stars.
//! - **Labels** (KTO): like when `u + rating_noise * N(0, 1) >= like_threshold`, flipped with
//!   probability `flip_rate`.
//! - **Region marks**: the evaluator's mask of each failing factor (score below 1 and a non-empty
//!   mask), and **reasons**: the failing factors; each failing factor is missed with probability
//!   `miss_rate`.
//!
//! A [`Panel`] owns the annotators, one random stream per annotator forked from the panel's one
//! seed (the same seed gives the same answers), and a [`Budget`] counting queries. [`agreement`]
//! measures how often two annotators agree on a pair neither calls a tie; as in the HPSv2 report
//! ("single human" 78.1% on HPDv2), that is the ceiling a reward model trained on such labels can
//! be expected to reach.
//!
//! The default weights are Tiller's choice (no paper fixes them): any failed prompt factor outweighs
//! any single aesthetic flaw, and an unasked forbidden mark outweighs everything but a missing
//! object plus a wrong count.

use crate::vocab::{
    AnnotatorId, AnnotatorRecord, Choice, Comparison, FactorLabel, ImageId, Label, PromptId,
    Provenance, Rating, Reason, RegionMark, RegionMask, Source, Stars,
};
use serde::{Deserialize, Serialize};
use tiller_core::{Error, Result, SeededRng};
use tiller_testbed::{Evaluation, Mask};

/// How much an annotator cares about each factor (non-negative, finite, not all zero).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TasteWeights {
    /// Asked-for objects present. Default 2.0.
    pub presence: f64,
    /// Object counts right. Default 1.5.
    pub count: f64,
    /// Colours right. Default 1.5.
    pub color: f64,
    /// Relations right. Default 1.5.
    pub position: f64,
    /// Colours bound to the right shapes. Default 1.5.
    pub binding: f64,
    /// No unasked forbidden mark. Default 3.0.
    pub forbidden_mark: f64,
    /// Items clear of the border. Default 0.5.
    pub border: f64,
    /// Clean background. Default 0.5.
    pub clean_background: f64,
    /// Balanced composition. Default 0.5.
    pub balance: f64,
    /// Crisp edges. Default 0.5.
    pub crisp_edges: f64,
}

impl Default for TasteWeights {
    fn default() -> Self {
        Self {
            presence: 2.0,
            count: 1.5,
            color: 1.5,
            position: 1.5,
            binding: 1.5,
            forbidden_mark: 3.0,
            border: 0.5,
            clean_background: 0.5,
            balance: 0.5,
            crisp_edges: 0.5,
        }
    }
}

impl TasteWeights {
    /// The weight of `factor`.
    pub fn get(&self, factor: FactorLabel) -> f64 {
        match factor {
            FactorLabel::MissingObject => self.presence,
            FactorLabel::WrongCount => self.count,
            FactorLabel::WrongColor => self.color,
            FactorLabel::WrongPosition => self.position,
            FactorLabel::WrongBinding => self.binding,
            FactorLabel::ForbiddenMark => self.forbidden_mark,
            FactorLabel::Border => self.border,
            FactorLabel::NoisyBackground => self.clean_background,
            FactorLabel::Blurry => self.crisp_edges,
            FactorLabel::Unbalanced => self.balance,
        }
    }

    fn get_mut(&mut self, factor: FactorLabel) -> &mut f64 {
        match factor {
            FactorLabel::MissingObject => &mut self.presence,
            FactorLabel::WrongCount => &mut self.count,
            FactorLabel::WrongColor => &mut self.color,
            FactorLabel::WrongPosition => &mut self.position,
            FactorLabel::WrongBinding => &mut self.binding,
            FactorLabel::ForbiddenMark => &mut self.forbidden_mark,
            FactorLabel::Border => &mut self.border,
            FactorLabel::NoisyBackground => &mut self.clean_background,
            FactorLabel::Blurry => &mut self.crisp_edges,
            FactorLabel::Unbalanced => &mut self.balance,
        }
    }

    /// The sum of the weights.
    pub fn total(&self) -> f64 {
        FactorLabel::ALL.iter().map(|f| self.get(*f)).sum()
    }

    /// Checks every weight is finite and non-negative and that they do not sum to zero.
    pub fn validate(&self) -> Result<()> {
        for f in FactorLabel::ALL {
            let w = self.get(f);
            if !w.is_finite() || w < 0.0 {
                return Err(Error::config(
                    format!("weights.{}", weight_name(f)),
                    format!("must be finite and non-negative, got {w}"),
                ));
            }
        }
        if self.total() <= 0.0 {
            return Err(Error::config(
                "weights",
                "at least one weight must be positive",
            ));
        }
        Ok(())
    }

    /// These weights, each multiplied by `exp(spread * z)` with `z` standard normal.
    pub fn perturbed(&self, spread: f64, rng: &mut SeededRng) -> Self {
        let mut out = self.clone();
        let z = rng.normal_vec(FactorLabel::ALL.len());
        for (f, z) in FactorLabel::ALL.iter().zip(z) {
            *out.get_mut(*f) *= (spread * z as f64).exp();
        }
        out
    }
}

fn weight_name(f: FactorLabel) -> &'static str {
    match f {
        FactorLabel::MissingObject => "presence",
        FactorLabel::WrongCount => "count",
        FactorLabel::WrongColor => "color",
        FactorLabel::WrongPosition => "position",
        FactorLabel::WrongBinding => "binding",
        FactorLabel::ForbiddenMark => "forbidden_mark",
        FactorLabel::Border => "border",
        FactorLabel::NoisyBackground => "clean_background",
        FactorLabel::Blurry => "crisp_edges",
        FactorLabel::Unbalanced => "balance",
    }
}

/// The evaluator's score for `factor`, in [0, 1]; unconstrained prompt factors count as met and the
/// forbidden mark scores 0 when it appears unasked, else 1.
pub fn factor_score(evaluation: &Evaluation, factor: FactorLabel) -> f64 {
    let f = &evaluation.factors;
    let a = &evaluation.parsed.aesthetics;
    match factor {
        FactorLabel::MissingObject => f.presence.score,
        FactorLabel::WrongCount => f.count.score,
        FactorLabel::WrongColor => f.color.as_ref().map_or(1.0, |x| x.score),
        FactorLabel::WrongPosition => f.position.as_ref().map_or(1.0, |x| x.score),
        FactorLabel::WrongBinding => f.binding.as_ref().map_or(1.0, |x| x.score),
        FactorLabel::ForbiddenMark => {
            if evaluation.mark.unasked() {
                0.0
            } else {
                1.0
            }
        }
        FactorLabel::Border => a.border.score,
        FactorLabel::NoisyBackground => a.clean_background.score,
        FactorLabel::Blurry => a.crisp_edges.score,
        FactorLabel::Unbalanced => a.balance.score,
    }
}

/// The evaluator's region mask for `factor` (`None` for an unconstrained prompt factor).
pub fn factor_mask(evaluation: &Evaluation, factor: FactorLabel) -> Option<&Mask> {
    let f = &evaluation.factors;
    let a = &evaluation.parsed.aesthetics;
    match factor {
        FactorLabel::MissingObject => Some(&f.presence.mask),
        FactorLabel::WrongCount => Some(&f.count.mask),
        FactorLabel::WrongColor => f.color.as_ref().map(|x| &x.mask),
        FactorLabel::WrongPosition => f.position.as_ref().map(|x| &x.mask),
        FactorLabel::WrongBinding => f.binding.as_ref().map(|x| &x.mask),
        FactorLabel::ForbiddenMark => Some(&evaluation.mark.mask),
        FactorLabel::Border => Some(&a.border.mask),
        FactorLabel::NoisyBackground => Some(&a.clean_background.mask),
        FactorLabel::Blurry => Some(&a.crisp_edges.mask),
        FactorLabel::Unbalanced => Some(&a.balance.mask),
    }
}

/// The factors an image fails (score below 1), in [`FactorLabel::ALL`] order.
pub fn failing_factors(evaluation: &Evaluation) -> Vec<FactorLabel> {
    FactorLabel::ALL
        .into_iter()
        .filter(|f| factor_score(evaluation, *f) < 1.0)
        .collect()
}

/// Normalised utility `sum_k w_k s_k / sum_k w_k`, in [0, 1]. A non-finite factor score is an error.
pub fn utility(weights: &TasteWeights, evaluation: &Evaluation) -> Result<f64> {
    let mut sum = 0.0;
    for f in FactorLabel::ALL {
        let s = factor_score(evaluation, f);
        if !s.is_finite() {
            return Err(Error::NonFinite(format!(
                "evaluator score for factor {} is {s}",
                weight_name(f)
            )));
        }
        sum += weights.get(f) * s;
    }
    Ok(sum / weights.total())
}

/// Bradley–Terry: `P(A > B) = sigmoid((u_a - u_b) / temperature)`, computed without overflow.
/// Swapping the pair gives `1 - p`; equal utilities give exactly 0.5.
pub fn bradley_terry(u_a: f64, u_b: f64, temperature: f64) -> f64 {
    let x = (u_a - u_b) / temperature;
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// How simulated annotators answer. Defaults are Tiller's (see the module docs); all units are the
/// normalised utility's, in [0, 1].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnnotatorConfig {
    /// The population's median taste.
    pub weights: TasteWeights,
    /// Log-normal spread of each annotator's weights around `weights` (0 = everyone identical).
    /// Default 0.3 (a weight's middle two-thirds range is about x0.74 to x1.35).
    pub spread: f64,
    /// Bradley–Terry temperature on utility differences. Default 0.05: one failed prompt factor
    /// (about 0.11 of the utility at the default weights) is preferred with probability about 0.9.
    pub temperature: f64,
    /// Utility differences below this are ties. Default 0.01.
    pub tie_margin: f64,
    /// Probability that a comparison or a label is flipped (a lapse). Default 0.05.
    pub flip_rate: f64,
    /// Standard deviation of the Gaussian noise added to the utility before rating or labelling.
    /// Default 0.05.
    pub rating_noise: f64,
    /// Increasing utility thresholds for 2, 3, 4 and 5 stars. Default [0.55, 0.7, 0.85, 0.95].
    pub rating_thresholds: [f64; 4],
    /// Noisy utility at or above which an image is liked. Default 0.9.
    pub like_threshold: f64,
    /// Probability that a failing factor goes unmentioned in a mark or a reason. Default 0.1.
    pub miss_rate: f64,
}

impl Default for AnnotatorConfig {
    fn default() -> Self {
        Self {
            weights: TasteWeights::default(),
            spread: 0.3,
            temperature: 0.05,
            tie_margin: 0.01,
            flip_rate: 0.05,
            rating_noise: 0.05,
            rating_thresholds: [0.55, 0.7, 0.85, 0.95],
            like_threshold: 0.9,
            miss_rate: 0.1,
        }
    }
}

impl AnnotatorConfig {
    /// Checks every field; errors name it as `annotator.<field>`.
    pub fn validate(&self) -> Result<()> {
        self.weights.validate().map_err(|e| match e {
            Error::Config { field, message } => {
                Error::config(format!("annotator.{field}"), message)
            }
            other => other,
        })?;
        let non_negative = [
            ("spread", self.spread),
            ("tie_margin", self.tie_margin),
            ("rating_noise", self.rating_noise),
        ];
        for (name, v) in non_negative {
            if !v.is_finite() || v < 0.0 {
                return Err(Error::config(
                    format!("annotator.{name}"),
                    format!("must be finite and non-negative, got {v}"),
                ));
            }
        }
        if !self.temperature.is_finite() || self.temperature <= 0.0 {
            return Err(Error::config(
                "annotator.temperature",
                format!("must be finite and positive, got {}", self.temperature),
            ));
        }
        for (name, p) in [("flip_rate", self.flip_rate), ("miss_rate", self.miss_rate)] {
            if !(0.0..=1.0).contains(&p) {
                return Err(Error::config(
                    format!("annotator.{name}"),
                    format!("is a probability, in [0, 1]; got {p}"),
                ));
            }
        }
        let t = self.rating_thresholds;
        if t.iter().any(|x| !x.is_finite()) || t.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::config(
                "annotator.rating_thresholds",
                format!("must be finite and strictly increasing, got {t:?}"),
            ));
        }
        if !self.like_threshold.is_finite() {
            return Err(Error::config(
                "annotator.like_threshold",
                format!("must be finite, got {}", self.like_threshold),
            ));
        }
        Ok(())
    }
}

/// A panel of simulated annotators.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PanelConfig {
    /// Number of annotators. Default 5.
    pub annotators: usize,
    /// Most queries the panel may be asked (`None`: unlimited). Default `None`.
    pub budget: Option<u64>,
    /// How each annotator answers.
    pub annotator: AnnotatorConfig,
}

impl Default for PanelConfig {
    fn default() -> Self {
        Self {
            annotators: 5,
            budget: None,
            annotator: AnnotatorConfig::default(),
        }
    }
}

/// Counts queries; with a limit, a query past it is an error (and is not counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    /// Queries answered so far.
    pub asked: u64,
    /// The most that may be answered.
    pub limit: Option<u64>,
}

impl Budget {
    /// A fresh budget.
    pub fn new(limit: Option<u64>) -> Self {
        Self { asked: 0, limit }
    }

    /// Counts `n` queries, or refuses all of them when that would pass the limit.
    pub fn charge(&mut self, n: u64) -> Result<()> {
        if let Some(limit) = self.limit
            && self.asked + n > limit
        {
            return Err(Error::invalid(format!(
                "annotation budget exhausted: {} of {limit} queries asked, {n} more requested; \
                 raise `budget` in the panel config",
                self.asked
            )));
        }
        self.asked += n;
        Ok(())
    }

    /// Queries left (`None`: unlimited).
    pub fn remaining(&self) -> Option<u64> {
        self.limit.map(|l| l - self.asked)
    }
}

/// An image with its gold evaluation against the prompt being judged.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// The image's id.
    pub image: &'a ImageId,
    /// `Evaluator::evaluate(image, prompt spec)`.
    pub evaluation: &'a Evaluation,
}

/// One simulated person: taste weights and a private random stream.
#[derive(Debug, Clone)]
pub struct SimulatedAnnotator {
    id: AnnotatorId,
    weights: TasteWeights,
    rng: SeededRng,
}

impl SimulatedAnnotator {
    /// The id feedback is recorded under.
    pub fn id(&self) -> &AnnotatorId {
        &self.id
    }

    /// This annotator's taste.
    pub fn weights(&self) -> &TasteWeights {
        &self.weights
    }

    /// This annotator's normalised utility for an evaluated image.
    pub fn utility(&self, evaluation: &Evaluation) -> Result<f64> {
        utility(&self.weights, evaluation)
    }
}

/// Simulated annotators sharing one seed and one query budget.
#[derive(Debug, Clone)]
pub struct Panel {
    config: AnnotatorConfig,
    seed: u64,
    annotators: Vec<SimulatedAnnotator>,
    budget: Budget,
}

impl Panel {
    /// `config.annotators` annotators named `sim-0`, `sim-1`, …, each with weights and a random
    /// stream forked, in order, from `SeededRng::new(seed)`.
    pub fn new(config: &PanelConfig, seed: u64) -> Result<Self> {
        config.annotator.validate()?;
        if config.annotators == 0 {
            return Err(Error::config(
                "annotators",
                "a panel needs at least one annotator",
            ));
        }
        let mut root = SeededRng::new(seed);
        let annotators = (0..config.annotators)
            .map(|i| {
                let mut rng = root.fork();
                let weights = config
                    .annotator
                    .weights
                    .perturbed(config.annotator.spread, &mut rng);
                SimulatedAnnotator {
                    id: AnnotatorId(format!("sim-{i}")),
                    weights,
                    rng,
                }
            })
            .collect();
        Ok(Self {
            config: config.annotator.clone(),
            seed,
            annotators,
            budget: Budget::new(config.budget),
        })
    }

    /// The annotators.
    /// Gives every annotator a fresh answer stream drawn from `seed`, keeping their tastes and
    /// ids: the same panel (same panel seed) labelling another collection without repeating its
    /// noise.
    pub fn reseed(&mut self, seed: u64) {
        let mut root = SeededRng::new(seed ^ 0xa076_1d64_78bd_642f);
        for a in &mut self.annotators {
            a.rng = root.fork();
        }
    }

    pub fn annotators(&self) -> &[SimulatedAnnotator] {
        &self.annotators
    }

    /// The query budget so far.
    pub fn budget(&self) -> Budget {
        self.budget
    }

    /// Store records for every annotator (with their weights).
    pub fn records(&self) -> Vec<AnnotatorRecord> {
        self.annotators
            .iter()
            .map(|a| AnnotatorRecord {
                id: a.id.clone(),
                source: Source::Simulated { seed: self.seed },
                taste: Some(a.weights.clone()),
            })
            .collect()
    }

    fn start(&mut self, annotator: usize) -> Result<(&mut SimulatedAnnotator, Provenance)> {
        let n = self.annotators.len();
        if annotator >= n {
            return Err(Error::invalid(format!(
                "annotator index {annotator} out of range: the panel has {n}"
            )));
        }
        self.budget.charge(1)?;
        let a = &mut self.annotators[annotator];
        let provenance = Provenance {
            annotator: a.id.clone(),
            source: Source::Simulated { seed: self.seed },
            time_ms: None,
        };
        Ok((a, provenance))
    }

    /// Annotator `annotator` compares `a` and `b` for `prompt`. Two uniforms are drawn per call
    /// whatever the outcome, so the stream's position depends only on the number of queries.
    pub fn compare(
        &mut self,
        annotator: usize,
        prompt: &PromptId,
        a: Candidate<'_>,
        b: Candidate<'_>,
    ) -> Result<Comparison> {
        let config = self.config.clone();
        let (ann, provenance) = self.start(annotator)?;
        let (u_a, u_b) = (ann.utility(a.evaluation)?, ann.utility(b.evaluation)?);
        let (pick, lapse) = (ann.rng.uniform(), ann.rng.uniform());
        let choice = if (u_a - u_b).abs() < config.tie_margin {
            Choice::Tie
        } else {
            let p = bradley_terry(u_a, u_b, config.temperature);
            let choice = if pick < p { Choice::A } else { Choice::B };
            if lapse < config.flip_rate {
                choice.swapped()
            } else {
                choice
            }
        };
        Ok(Comparison {
            prompt: prompt.clone(),
            image_a: a.image.clone(),
            image_b: b.image.clone(),
            choice,
            provenance,
        })
    }

    /// Annotator `annotator` rates `c` with 1–5 stars; `score` records the noiseless utility.
    pub fn rate(
        &mut self,
        annotator: usize,
        prompt: &PromptId,
        c: Candidate<'_>,
    ) -> Result<Rating> {
        let config = self.config.clone();
        let (ann, provenance) = self.start(annotator)?;
        let u = ann.utility(c.evaluation)?;
        let noisy = u + config.rating_noise * ann.rng.normal_vec(1)[0] as f64;
        let stars = 1 + config
            .rating_thresholds
            .iter()
            .filter(|t| noisy >= **t)
            .count() as u8;
        Ok(Rating {
            prompt: prompt.clone(),
            image: c.image.clone(),
            stars: Stars::new(stars)?,
            score: Some(u),
            provenance,
        })
    }

    /// Annotator `annotator` likes `c` or not.
    pub fn label(
        &mut self,
        annotator: usize,
        prompt: &PromptId,
        c: Candidate<'_>,
    ) -> Result<Label> {
        let config = self.config.clone();
        let (ann, provenance) = self.start(annotator)?;
        let u = ann.utility(c.evaluation)?;
        let noisy = u + config.rating_noise * ann.rng.normal_vec(1)[0] as f64;
        let lapse = ann.rng.uniform() < config.flip_rate;
        Ok(Label {
            prompt: prompt.clone(),
            image: c.image.clone(),
            like: (noisy >= config.like_threshold) != lapse,
            provenance,
        })
    }

    /// Annotator `annotator` marks the region of each failing factor that has one (one query).
    pub fn mark(
        &mut self,
        annotator: usize,
        prompt: &PromptId,
        c: Candidate<'_>,
    ) -> Result<Vec<RegionMark>> {
        let miss_rate = self.config.miss_rate;
        let (ann, provenance) = self.start(annotator)?;
        let mut marks = Vec::new();
        for factor in failing_factors(c.evaluation) {
            let missed = ann.rng.uniform() < miss_rate;
            let Some(mask) = factor_mask(c.evaluation, factor).filter(|m| !m.is_empty()) else {
                continue;
            };
            if !missed {
                marks.push(RegionMark {
                    prompt: prompt.clone(),
                    image: c.image.clone(),
                    mask: RegionMask::from_testbed(mask)?,
                    factor,
                    provenance: provenance.clone(),
                });
            }
        }
        Ok(marks)
    }

    /// Annotator `annotator` says which factors `c` fails.
    pub fn reason(
        &mut self,
        annotator: usize,
        prompt: &PromptId,
        c: Candidate<'_>,
    ) -> Result<Reason> {
        let miss_rate = self.config.miss_rate;
        let (ann, provenance) = self.start(annotator)?;
        let mut factors = Vec::new();
        for factor in failing_factors(c.evaluation) {
            if ann.rng.uniform() >= miss_rate {
                factors.push(factor);
            }
        }
        Ok(Reason {
            prompt: prompt.clone(),
            image: c.image.clone(),
            factors,
            provenance,
        })
    }

    /// Every annotator compares every pair (`annotators x pairs` queries, charged up front), and
    /// the [`agreement`] of their answers is returned.
    pub fn agreement_on(
        &mut self,
        prompt: &PromptId,
        pairs: &[(Candidate<'_>, Candidate<'_>)],
    ) -> Result<f64> {
        let n = (self.annotators.len() * pairs.len()) as u64;
        self.budget.charge(n)?;
        // The queries below are already paid for.
        self.budget.asked -= n;
        let mut choices = Vec::with_capacity(self.annotators.len());
        for i in 0..self.annotators.len() {
            let mut row = Vec::with_capacity(pairs.len());
            for (a, b) in pairs {
                row.push(self.compare(i, prompt, *a, *b)?.choice);
            }
            choices.push(row);
        }
        agreement(&choices)
    }
}

/// Inter-annotator agreement: for every two annotators, the fraction of pairs that neither called a
/// tie on which they chose the same image; averaged over the annotator pairs that share at least one
/// such pair. `choices[i][j]` is annotator `i`'s answer on pair `j`.
///
/// An error when there are fewer than two annotators, the rows differ in length, or no two
/// annotators share a non-tie pair.
pub fn agreement(choices: &[Vec<Choice>]) -> Result<f64> {
    if choices.len() < 2 {
        return Err(Error::invalid(format!(
            "agreement needs at least two annotators, got {}",
            choices.len()
        )));
    }
    let pairs = choices[0].len();
    if let Some((i, row)) = choices.iter().enumerate().find(|(_, r)| r.len() != pairs) {
        return Err(Error::invalid(format!(
            "annotator {i} answered {} pairs, annotator 0 answered {pairs}",
            row.len()
        )));
    }
    let mut fractions = Vec::new();
    for i in 0..choices.len() {
        for j in i + 1..choices.len() {
            let both: Vec<(Choice, Choice)> = choices[i]
                .iter()
                .zip(&choices[j])
                .filter(|(a, b)| **a != Choice::Tie && **b != Choice::Tie)
                .map(|(a, b)| (*a, *b))
                .collect();
            if !both.is_empty() {
                let agree = both.iter().filter(|(a, b)| a == b).count();
                fractions.push(agree as f64 / both.len() as f64);
            }
        }
    }
    if fractions.is_empty() {
        return Err(Error::invalid(
            "agreement is undefined: no two annotators both answered a non-tie pair",
        ));
    }
    Ok(fractions.iter().sum::<f64>() / fractions.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors_name_the_field() {
        let mut c = AnnotatorConfig {
            temperature: 0.0,
            ..Default::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("annotator.temperature"), "{e}");
        c.temperature = 0.05;
        c.weights.balance = f64::NAN;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("annotator.weights.balance"), "{e}");
        let e = serde_json::from_str::<AnnotatorConfig>(r#"{"temprature": 1}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("temprature") && e.contains("temperature"), "{e}");
    }

    #[test]
    fn budget_refuses_past_its_limit_without_counting() {
        let mut b = Budget::new(Some(3));
        b.charge(2).unwrap();
        let e = b.charge(2).unwrap_err().to_string();
        assert!(e.contains("2 of 3 queries"), "{e}");
        assert_eq!(b.asked, 2);
        b.charge(1).unwrap();
        assert_eq!(b.remaining(), Some(0));
    }
}
