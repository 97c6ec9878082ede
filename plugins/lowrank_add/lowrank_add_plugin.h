// TensorRT IPluginV3 glue for the LowRankAdd node of slim-trt's `plugin` export.
//
// ONNX node (written by slim_trt.exporter): op_type "LowRankAdd", domain "slim_trt",
// attributes plugin_version="1", plugin_namespace="slim_trt"; TensorRT's ONNX parser looks the creator up by
// (op_type, plugin_version, plugin_namespace) = ("LowRankAdd", "1", "slim_trt").
//
// Inputs, dense adapters (the ONNX export today, 4 inputs):
//   0 Y [..., N]   1 X [..., K]   2 R [r, K]   3 L [N, r]        all fp16, bf16 or fp32 (one type)
// Inputs, 4-bit adapters consumed directly (6 inputs, for a fused graph that keeps the packed bytes):
//   0 Y  1 X  2 Rq (uint8/int8 bytes, ONNX INT4 packing of R)  3 Rs fp16 [r, ceil(K/G)]
//   4 Lq (bytes of L)  5 Ls fp16 [N, ceil(r/G)]      G = plugin field "group_size" (default 128)
// Output 0: Y + (X R^T) L^T, shape and type of Y.
#pragma once

#include <string>
#include <vector>

#include "NvInfer.h"

namespace slim_trt
{
namespace lowrank_add
{

constexpr char const* kPLUGIN_NAME = "LowRankAdd";
constexpr char const* kPLUGIN_VERSION = "1";
constexpr char const* kPLUGIN_NAMESPACE = "slim_trt";

class LowRankAddPlugin : public nvinfer1::IPluginV3,
                         public nvinfer1::IPluginV3OneCore,
                         public nvinfer1::IPluginV3OneBuild,
                         public nvinfer1::IPluginV3OneRuntime
{
public:
    explicit LowRankAddPlugin(int32_t groupSize);
    LowRankAddPlugin(LowRankAddPlugin const& other);
    LowRankAddPlugin& operator=(LowRankAddPlugin const&) = delete;
    ~LowRankAddPlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    void initFieldsToSerialize();

    int32_t mGroupSize;
    std::vector<nvinfer1::PluginField> mDataToSerialize;
    nvinfer1::PluginFieldCollection mFCToSerialize{};
};

class LowRankAddPluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    LowRankAddPluginCreator();
    ~LowRankAddPluginCreator() override = default;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFC{};
};

} // namespace lowrank_add
} // namespace slim_trt
