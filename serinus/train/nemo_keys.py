"""The NeMo training-config keys Serinus knows (fast-conformer_aed.yaml and Lightning's trainer), by what
Serinus does with them: KNOWN (read by the translation in nemo_config.py), SAME (silent when they hold the
value Serinus behaves as anyway), MOOT (no effect on what Serinus trains or writes)."""

from __future__ import annotations

MISSING = "???"  # OmegaConf's mandatory value

TOP_LEVEL = tuple("""name model trainer exp_manager spl_tokens init_from_nemo_model init_from_pretrained_model
    init_from_ptl_ckpt init_strict serinus hydra""".split())
LIGHTNING_TRAINER = tuple("""accelerator strategy devices num_nodes precision logger callbacks fast_dev_run max_epochs
    min_epochs max_steps min_steps max_time limit_train_batches limit_val_batches limit_test_batches
    limit_predict_batches overfit_batches val_check_interval check_val_every_n_epoch num_sanity_val_steps
    log_every_n_steps enable_checkpointing enable_progress_bar enable_model_summary accumulate_grad_batches
    gradient_clip_val gradient_clip_algorithm deterministic benchmark inference_mode use_distributed_sampler profiler
    detect_anomaly barebones plugins sync_batchnorm reload_dataloaders_every_n_epochs default_root_dir
    model_registry""".split())  # lightning.pytorch.Trainer's arguments: NeMo passes trainer: to it
EXP_MANAGER = tuple("""explicit_log_dir exp_dir name version use_datetime_version resume_if_exists resume_past_end
    resume_ignore_no_checkpoint resume_from_checkpoint create_tensorboard_logger summary_writer_kwargs
    create_wandb_logger wandb_logger_kwargs create_mlflow_logger mlflow_logger_kwargs create_dllogger_logger
    dllogger_logger_kwargs create_clearml_logger clearml_logger_kwargs create_neptune_logger neptune_logger_kwargs
    create_checkpoint_callback checkpoint_callback_params create_early_stopping_callback
    early_stopping_callback_params create_preemption_callback files_to_copy log_step_timing step_timing_kwargs
    log_local_rank_0_only log_global_rank_0_only disable_validation_on_resume ema max_time_per_run
    seconds_to_sleep create_straggler_detection_callback straggler_detection_params create_fault_tolerance_callback
    fault_tolerance log_tflops_per_sec_per_gpu""".split())  # nemo.utils.exp_manager.ExpManagerConfig
LHOTSE_DATASET = tuple("""use_lhotse input_cfg manifest_filepath tarred_audio_filepaths cuts_path shar_path
    skip_missing_manifest_entries batch_size batch_duration quadratic_duration use_bucketing bucket_batch_size
    num_buckets num_cuts_for_bins_estimate bucket_duration_bins bucket_buffer_size concurrent_bucketing
    bucketing_2d_strict_mode shuffle_buffer_size drop_last shard_seed max_open_streams multi_config sampler_fusion
    sampler_weights pretokenize prompt_format use_multimodal_sampling token_equivalent_duration batch_tokens
    quadratic_factor min_duration max_duration min_tps max_tps min_tokens max_tokens measure_total_length min_tpt
    max_tpt shuffle sample_rate seed num_workers pin_memory channel_selector noise_path noise_snr noise_mix_prob
    perturb_speed concatenate_samples concatenate_gap_seconds concatenate_duration_factor
    concatenate_merge_supervisions db_norm truncate_duration truncate_offset_type cut_into_windows_duration
    cut_into_windows_hop keep_excessive_supervisions rir_enabled rir_path rir_prob pad_min_duration pad_direction
    text_field lang_field metadata_only force_finite force_map_dataset force_iterable_dataset
    use_start_end_token""".split())  # nemo...lhotse.dataloader.LhotseDataLoadingConfig + the classic keys
NEMO_ENCODER = tuple("""_target_ feat_in n_layers d_model feat_out causal_downsampling subsampling subsampling_factor
    subsampling_conv_chunking_factor subsampling_conv_channels reduction reduction_position reduction_factor
    ff_expansion_factor self_attention_model n_heads att_context_size att_context_probs att_context_style xscaling
    untie_biases pos_emb_max_len conv_kernel_size conv_norm_type conv_context_size use_bias dropout
    dropout_pre_encoder dropout_emb dropout_att stochastic_depth_drop_prob stochastic_depth_mode
    stochastic_depth_start_layer global_tokens global_tokens_spacing global_attn_separate use_pytorch_sdpa
    use_pytorch_sdpa_backends sync_max_audio_length""".split())  # ConformerEncoder's arguments
NEMO_DECODER = tuple("""hidden_size num_layers inner_size num_attention_heads max_sequence_length num_token_types
    embedding_dropout learn_positional_encodings ffn_dropout attn_score_dropout attn_layer_dropout hidden_act pre_ln
    pre_ln_final_layer_norm vocab_size""".split())  # transf_decoder.config_dict
NEMO_PREPROCESSOR = tuple("""_target_ sample_rate window_size window_stride n_window_size n_window_stride window
    normalize n_fft preemph features lowfreq highfreq log log_zero_guard_type log_zero_guard_value dither pad_to
    frame_splicing exact_pad pad_value mag_power rng nb_augmentation_prob nb_max_freq use_torchaudio mel_norm
    stft_exact_pad stft_conv""".split())  # AudioToMelSpectrogramPreprocessor's arguments
NEMO_SPEC_AUGMENT = tuple("""_target_ freq_masks time_masks freq_width time_width rect_masks rect_time rect_freq rng
    mask_value use_vectorized_spec_augment use_numba_spec_augment""".split())
NEMO_OPTIM = tuple("name lr betas weight_decay eps amsgrad momentum foreach fused capturable".split())

# what the Serinus side reads besides the dataclass fields (EncoderConfig/FeatureConfig/DecoderConfig.from_nemo)
ENCODER_READ = ("feat_out", "causal_downsampling", "att_context_size", "reduction", "subsampling_conv_channels")
PREPROCESSOR_READ = ("_target_", "features", "nfilt", "n_mels", "n_window_size", "n_window_stride",
                     "frame_splicing", "exact_pad", "stft_exact_pad", "stft_conv", "use_torchaudio", "mel_norm")
DECODER_READ = ("hidden_size", "inner_size", "num_layers", "num_attention_heads", "max_sequence_length",
                "hidden_act", "ffn_dropout", "pre_ln", "learn_positional_encodings")
SPEC_AUGMENT_READ = ("freq_masks", "freq_width", "time_masks", "time_width")

# keys NeMo reads that an override may set where the YAML does not have them ("*": any name, "**": below)
KNOWN = [(k,) for k in TOP_LEVEL] + [("serinus", "**"), ("trainer", "strategy", "**")]
KNOWN += [(init, "*", f) for init in ("init_from_nemo_model", "init_from_pretrained_model", "init_from_ptl_ckpt")
          for f in ("path", "name", "include", "exclude")]
KNOWN += [("spl_tokens", k) for k in ("model_dir", "tokens", "force_rebuild")]
KNOWN += [("trainer", k) for k in LIGHTNING_TRAINER]
KNOWN += [("exp_manager", k) for k in EXP_MANAGER] + [("exp_manager", k, "**") for k in EXP_MANAGER]
KNOWN += [("model", ds, k) for ds in ("train_ds", "validation_ds", "test_ds") for k in LHOTSE_DATASET]
KNOWN += [("model", "tokenizer", k) for k in ("dir", "type", "langs")]
KNOWN += [("model", "tokenizer", "langs", "*", k) for k in ("dir", "type")]
KNOWN += [("model", "encoder", k) for k in NEMO_ENCODER]
KNOWN += [("model", "transf_decoder", "config_dict", k) for k in NEMO_DECODER]
KNOWN += [("model", "preprocessor", k) for k in NEMO_PREPROCESSOR]
KNOWN += [("model", "spec_augment", k) for k in NEMO_SPEC_AUGMENT]
KNOWN += [("model", "optim", k) for k in NEMO_OPTIM] + [("model", "optim", "sched", "**")]
KNOWN += [("model", "decoding", k) for k in ("strategy", "return_best_hypothesis")]
KNOWN += [("model", "decoding", k, "**") for k in ("beam", "greedy")]
KNOWN += [("model", k) for k in ("prompt_format", "prompt_defaults", "sample_rate", "label_smoothing",
                                 "use_loss_mask_for_prompt", "log_prediction", "model_defaults")]
KNOWN += [("model", "model_defaults", "*")]

_NEMO = "nemo.collections."
# NeMo keys whose value here is what Serinus does anyway (silent); another value is "not acted on"
SAME = {
    "spl_tokens.force_rebuild": False, "model.log_prediction": True, "model.prompt_defaults": None,
    "model.multitask_metrics_cfg.log_predictions": True,
    "model.multitask_metrics_cfg.metrics.wer._target_": _NEMO + "asr.metrics.WER",
    "model.multitask_metrics_cfg.metrics.wer.constraint": ".source_lang==.target_lang",
    "model.multitask_metrics_cfg.metrics.bleu._target_": _NEMO + "asr.metrics.BLEU",
    "model.multitask_metrics_cfg.metrics.bleu.constraint": ".source_lang!=.target_lang",
    "model.multitask_metrics_cfg.metrics.bleu.bleu_tokenizer": "13a",
    "model.multitask_metrics_cfg.metrics.bleu.check_cuts_for_bleu_tokenizers": False,
    "model.train_ds.use_lhotse": True, "model.train_ds.bucket_buffer_size": 20000,
    "model.train_ds.text_field": "text", "model.train_ds.lang_field": "target_lang",
    "model.validation_ds.use_lhotse": True, "model.validation_ds.shuffle": False,
    "model.validation_ds.use_start_end_token": True, "model.validation_ds.use_bucketing": False,
    "model.validation_ds.text_field": "text", "model.validation_ds.lang_field": "target_lang",
    "model.tokenizer.custom_tokenizer._target_": _NEMO + "common.tokenizers.canary_tokenizer.CanaryTokenizer",
    "model.tokenizer.custom_tokenizer.tokenizers": None,
    "model.spec_augment._target_": _NEMO + "asr.modules.SpectrogramAugmentation",
    "model.spec_augment.rect_masks": 0, "model.spec_augment.mask_value": 0.0,
    "model.encoder._target_": _NEMO + "asr.modules.ConformerEncoder", "model.encoder.reduction_position": None,
    "model.encoder.reduction_factor": 1, "model.encoder.conv_context_size": None,
    "model.transf_decoder._target_": _NEMO + "asr.modules.transformer.get_nemo_transformer",
    "model.transf_decoder.model_name": None, "model.transf_decoder.pretrained": False,
    "model.transf_decoder.encoder": None, "model.transf_decoder.pre_ln_final_layer_norm": True,
    "model.transf_decoder.config_dict.num_token_types": 0, "model.transf_decoder.config_dict.vocab_size": "None",
    "model.head._target_": _NEMO + "asr.parts.submodules.token_classifier.TokenClassifier",
    "model.head.log_softmax": True, "model.head.num_classes": "None", "model.head.dropout": 0.0,
    "model.head.use_transformer_init": True, "model.decoding.return_best_hypothesis": True,
    "model.loss._target_": _NEMO + "common.losses.smoothed_cross_entropy.SmoothedCrossEntropyLoss",
    "model.loss.pad_id": None, "model.optim.sched.name": "InverseSquareRootAnnealing",
    "trainer.max_epochs": -1, "trainer.strategy": "ddp",
    "trainer.strategy._target_": "lightning.pytorch.strategies.DDPStrategy",
    "trainer.strategy.gradient_as_bucket_view": True, "trainer.gradient_clip_algorithm": "norm",
    "trainer.check_val_every_n_epoch": 1, "trainer.enable_checkpointing": False, "trainer.logger": False,
    "trainer.use_distributed_sampler": False, "exp_manager.create_checkpoint_callback": True,
    "exp_manager.resume_from_checkpoint": None, "exp_manager.resume_past_end": False,
    **{f"exp_manager.create_{k}": False for k in ("wandb_logger", "mlflow_logger", "dllogger_logger",
                                                  "clearml_logger", "neptune_logger", "early_stopping_callback")},
}
# keys (and prefixes) with no effect on what Serinus trains or writes, whatever their value
MOOT = ("hydra", "model.test_ds", "model.validation_ds.num_workers", "model.validation_ds.pin_memory",
        "model.train_ds.pin_memory", "model.decoding.beam.len_pen", "trainer.enable_progress_bar",
        "trainer.enable_model_summary", "exp_manager.early_stopping_callback_params", "exp_manager.log_step_timing",
        "exp_manager.step_timing_kwargs", "exp_manager.log_local_rank_0_only", "exp_manager.log_global_rank_0_only",
        "exp_manager.seconds_to_sleep", "exp_manager.create_preemption_callback",
        "exp_manager.disable_validation_on_resume") + tuple(
    f"exp_manager.{k}_logger_kwargs" for k in ("wandb", "mlflow", "dllogger", "clearml", "neptune"))
