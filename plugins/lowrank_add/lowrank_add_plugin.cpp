// TensorRT IPluginV3 glue for LowRankAdd; the math lives in lowrank_add_kernel.cu.
//
// Written against the TensorRT 10.x / 11.x headers (NvInferRuntime.h: IPluginV3, IPluginV3OneCore,
// IPluginV3OneBuild, IPluginV3OneRuntime, IPluginCreatorV3One) following NVIDIA's sampleNonZeroPlugin.
// Registration, chosen at compile time (see CMakeLists.txt):
//   LOWRANK_ADD_STATIC_REGISTRATION=1  the creator registers itself when the library is loaded (dlopen,
//        ctypes.CDLL, LD_PRELOAD, trtexec --staticPlugins, Polygraphy --plugins, slim-trt build --plugins);
//   LOWRANK_ADD_STATIC_REGISTRATION=0  the library exports getCreators()/setLoggerFinder() for
//        IPluginRegistry::loadLibrary (trtexec --dynamicPlugins, --setPluginsToSerialize).
// Built as two libraries so that no creator is ever registered twice.
#include "lowrank_add_plugin.h"

#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>

#include "lowrank_add_kernel.h"

using namespace nvinfer1;

namespace slim_trt
{
namespace lowrank_add
{
namespace
{

constexpr int32_t kDENSE_INPUTS = 4;
constexpr int32_t kINT4_INPUTS = 6;

ILoggerFinder* gLoggerFinder{nullptr};
std::mutex gLoggerMutex;

void logError(char const* message) noexcept
{
    std::lock_guard<std::mutex> lock(gLoggerMutex);
    ILogger* logger = gLoggerFinder != nullptr ? gLoggerFinder->findLogger() : nullptr;
    if (logger != nullptr)
    {
        logger->log(ILogger::Severity::kERROR, message);
    }
    else
    {
        std::fprintf(stderr, "[slim_trt LowRankAdd] %s\n", message);
    }
}

bool isIoType(DataType t)
{
    return t == DataType::kHALF || t == DataType::kBF16 || t == DataType::kFLOAT;
}

bool toKernelType(DataType t, DType& out)
{
    switch (t)
    {
    case DataType::kFLOAT: out = DType::kFLOAT; return true;
    case DataType::kHALF: out = DType::kHALF; return true;
    case DataType::kBF16: out = DType::kBF16; return true;
    default: return false;
    }
}

int64_t leadingVolume(Dims const& d)
{
    int64_t v = 1;
    for (int32_t i = 0; i + 1 < d.nbDims; ++i)
    {
        v *= d.d[i];
    }
    return v;
}

int64_t volume(Dims const& d)
{
    int64_t v = 1;
    for (int32_t i = 0; i < d.nbDims; ++i)
    {
        v *= d.d[i];
    }
    return v;
}

int64_t lastDim(Dims const& d)
{
    return d.nbDims > 0 ? d.d[d.nbDims - 1] : -1;
}

int64_t ceilDiv(int64_t a, int64_t b)
{
    return (a + b - 1) / b;
}

// Known dims must agree; -1 (dynamic at build time) agrees with anything.
bool agree(int64_t a, int64_t b)
{
    return a < 0 || b < 0 || a == b;
}

// Checks the shapes TensorRT hands us (build-time with -1 for dynamic dims, or runtime).
bool shapesValid(Dims const* d, int32_t nbInputs, int32_t groupSize)
{
    Dims const& y = d[0];
    Dims const& x = d[1];
    if (y.nbDims < 2 || x.nbDims != y.nbDims)
    {
        return false;
    }
    for (int32_t i = 0; i + 1 < y.nbDims; ++i)
    {
        if (!agree(y.d[i], x.d[i]))
        {
            return false;
        }
    }
    int64_t const N = lastDim(y);
    int64_t const K = lastDim(x);
    if (nbInputs == kDENSE_INPUTS)
    {
        Dims const& r = d[2];
        Dims const& l = d[3];
        return r.nbDims == 2 && l.nbDims == 2 && agree(r.d[1], K) && agree(l.d[0], N) && agree(l.d[1], r.d[0]);
    }
    Dims const& rs = d[3];
    Dims const& ls = d[5];
    if (rs.nbDims != 2 || ls.nbDims != 2 || !agree(ls.d[0], N))
    {
        return false;
    }
    int64_t const rank = rs.d[0];
    bool ok = true;
    if (K > 0)
    {
        ok = ok && agree(rs.d[1], ceilDiv(K, groupSize));
    }
    if (rank > 0)
    {
        ok = ok && agree(ls.d[1], ceilDiv(rank, groupSize));
    }
    if (rank > 0 && K > 0 && volume(d[2]) >= 0)
    {
        ok = ok && volume(d[2]) == ceilDiv(rank * K, 2); // packed R: two values per byte, no row padding
    }
    if (rank > 0 && N > 0 && volume(d[4]) >= 0)
    {
        ok = ok && volume(d[4]) == ceilDiv(N * rank, 2);
    }
    return ok;
}

} // namespace

// ---------------------------------------------------------------------------------------------------------
// LowRankAddPlugin

LowRankAddPlugin::LowRankAddPlugin(int32_t groupSize)
    : mGroupSize(groupSize)
{
    initFieldsToSerialize();
}

LowRankAddPlugin::LowRankAddPlugin(LowRankAddPlugin const& other)
    : IPluginV3(other)
    , IPluginV3OneCore(other)
    , IPluginV3OneBuild(other)
    , IPluginV3OneRuntime(other)
    , mGroupSize(other.mGroupSize)
{
    initFieldsToSerialize(); // the copied field list would point into `other`
}

void LowRankAddPlugin::initFieldsToSerialize()
{
    mDataToSerialize.clear();
    mDataToSerialize.emplace_back("group_size", &mGroupSize, PluginFieldType::kINT32, 1);
    mFCToSerialize.nbFields = static_cast<int32_t>(mDataToSerialize.size());
    mFCToSerialize.fields = mDataToSerialize.data();
}

IPluginCapability* LowRankAddPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    }
    return nullptr;
}

IPluginV3* LowRankAddPlugin::clone() noexcept
{
    try
    {
        return new LowRankAddPlugin(*this);
    }
    catch (std::exception const& e)
    {
        logError(e.what());
    }
    return nullptr;
}

char const* LowRankAddPlugin::getPluginName() const noexcept
{
    return kPLUGIN_NAME;
}

char const* LowRankAddPlugin::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* LowRankAddPlugin::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

int32_t LowRankAddPlugin::getNbOutputs() const noexcept
{
    return 1;
}

int32_t LowRankAddPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbOutputs != 1 || (nbInputs != kDENSE_INPUTS && nbInputs != kINT4_INPUTS))
    {
        logError("LowRankAdd takes 4 inputs (Y, X, R, L) or 6 (Y, X, Rq, Rscale, Lq, Lscale) and has 1 output");
        return -1;
    }
    outputTypes[0] = inputTypes[0]; // strongly typed: the output has Y's type
    return 0;
}

int32_t LowRankAddPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
    int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& /*exprBuilder*/) noexcept
{
    if (nbOutputs != 1 || (nbInputs != kDENSE_INPUTS && nbInputs != kINT4_INPUTS))
    {
        return -1;
    }
    outputs[0] = inputs[0];
    return 0;
}

bool LowRankAddPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbOutputs != 1 || pos < 0 || pos >= nbInputs + nbOutputs || inOut[pos].desc.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    DataType const t = inOut[pos].desc.type;
    if (pos == 0)
    {
        return isIoType(t);
    }
    DataType const io = inOut[0].desc.type;
    if (nbInputs == kDENSE_INPUTS)
    {
        return t == io; // Y, X, R, L and the output share one type
    }
    if (nbInputs == kINT4_INPUTS)
    {
        switch (pos)
        {
        case 1:
        case 6: return t == io;
        case 2:
        case 4: return t == DataType::kUINT8 || t == DataType::kINT8; // raw packed bytes, never dequantized by TRT
        case 3:
        case 5: return t == DataType::kHALF;
        default: return false;
        }
    }
    return false;
}

int32_t LowRankAddPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbOutputs != 1 || (nbInputs != kDENSE_INPUTS && nbInputs != kINT4_INPUTS))
    {
        return -1;
    }
    Dims dims[kINT4_INPUTS];
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        dims[i] = in[i].desc.dims;
    }
    if (!shapesValid(dims, nbInputs, mGroupSize))
    {
        logError("LowRankAdd: inputs must be Y [..., N], X [..., K], R [r, K], L [N, r] (or packed INT4 R/L with "
                 "fp16 scales [r, ceil(K/G)], [N, ceil(r/G)])");
        return -1;
    }
    return 0;
}

size_t LowRankAddPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    int64_t const maxTokens = leadingVolume(inputs[1].max);
    int64_t const rank = nbInputs == kDENSE_INPUTS ? inputs[2].max.d[0] : inputs[3].max.d[0];
    return workspaceBytes(maxTokens, rank);
}

int32_t LowRankAddPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbOutputs != 1 || (nbInputs != kDENSE_INPUTS && nbInputs != kINT4_INPUTS))
    {
        return -1;
    }
    Dims dims[kINT4_INPUTS];
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        dims[i] = in[i].dims;
    }
    return shapesValid(dims, nbInputs, mGroupSize) ? 0 : -1;
}

int32_t LowRankAddPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    DType dtype{};
    if (!toKernelType(inputDesc[0].type, dtype))
    {
        logError("LowRankAdd: unsupported I/O type (use fp16, bf16 or fp32)");
        return -1;
    }
    Shape shape{};
    shape.M = leadingVolume(inputDesc[1].dims);
    shape.K = lastDim(inputDesc[1].dims);
    shape.N = lastDim(inputDesc[0].dims);
    cudaError_t status = cudaSuccess;
    // The plugin's input count is fixed by the ONNX node; it was checked in configurePlugin.
    bool const dense = inputDesc[2].type != DataType::kUINT8 && inputDesc[2].type != DataType::kINT8;
    if (dense)
    {
        shape.r = inputDesc[2].dims.d[0];
        status = launchDense(dtype, shape, inputs[0], inputs[1], inputs[2], inputs[3], outputs[0], workspace, stream);
    }
    else
    {
        shape.r = inputDesc[3].dims.d[0];
        status = launchInt4(dtype, shape, mGroupSize, inputs[0], inputs[1], static_cast<uint8_t const*>(inputs[2]),
            inputs[3], static_cast<uint8_t const*>(inputs[4]), inputs[5], outputs[0], workspace, stream);
    }
    if (status != cudaSuccess)
    {
        logError(cudaGetErrorString(status));
        return -1;
    }
    return 0;
}

IPluginV3* LowRankAddPlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    return clone(); // no per-context resources
}

PluginFieldCollection const* LowRankAddPlugin::getFieldsToSerialize() noexcept
{
    return &mFCToSerialize;
}

// ---------------------------------------------------------------------------------------------------------
// LowRankAddPluginCreator

LowRankAddPluginCreator::LowRankAddPluginCreator()
{
    mFields.emplace_back("group_size", nullptr, PluginFieldType::kINT32, 1);
    mFC.nbFields = static_cast<int32_t>(mFields.size());
    mFC.fields = mFields.data();
}

char const* LowRankAddPluginCreator::getPluginName() const noexcept
{
    return kPLUGIN_NAME;
}

char const* LowRankAddPluginCreator::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* LowRankAddPluginCreator::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

PluginFieldCollection const* LowRankAddPluginCreator::getFieldNames() noexcept
{
    return &mFC;
}

IPluginV3* LowRankAddPluginCreator::createPlugin(
    char const* /*name*/, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    try
    {
        int32_t groupSize = kDefaultGroupSize;
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
        {
            PluginField const& f = fc->fields[i];
            if (f.name != nullptr && std::strcmp(f.name, "group_size") == 0 && f.type == PluginFieldType::kINT32
                && f.length == 1 && f.data != nullptr)
            {
                groupSize = *static_cast<int32_t const*>(f.data);
            }
        }
        if (groupSize <= 0)
        {
            logError("LowRankAdd: group_size must be positive");
            return nullptr;
        }
        return new LowRankAddPlugin(groupSize);
    }
    catch (std::exception const& e)
    {
        logError(e.what());
    }
    return nullptr;
}

} // namespace lowrank_add
} // namespace slim_trt

// ---------------------------------------------------------------------------------------------------------
// Registration

#if LOWRANK_ADD_STATIC_REGISTRATION
namespace
{
// Registers the creator under its own namespace when the library is loaded. (The stock
// REGISTER_TENSORRT_PLUGIN macro passes an empty namespace to registerCreator.)
struct StaticRegistration
{
    StaticRegistration()
    {
        static slim_trt::lowrank_add::LowRankAddPluginCreator creator;
        getPluginRegistry()->registerCreator(creator, slim_trt::lowrank_add::kPLUGIN_NAMESPACE);
    }
};
StaticRegistration const gStaticRegistration{};
} // namespace
#else
// TENSORRTAPI expands to nothing outside TensorRT's own build (NvInferRuntimeBase.h, 10.x and 11.x), and the
// CMake targets hide every symbol by default, so the two entry points that IPluginRegistry::loadLibrary and
// trtexec --dynamicPlugins look up by name need default visibility spelled out here.
#define LOWRANK_ADD_EXPORT extern "C" __attribute__((visibility("default")))

LOWRANK_ADD_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    std::lock_guard<std::mutex> lock(slim_trt::lowrank_add::gLoggerMutex);
    if (slim_trt::lowrank_add::gLoggerFinder == nullptr)
    {
        slim_trt::lowrank_add::gLoggerFinder = finder;
    }
}

LOWRANK_ADD_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static slim_trt::lowrank_add::LowRankAddPluginCreator creator;
    static nvinfer1::IPluginCreatorInterface* const kCreators[] = {&creator};
    nbCreators = 1;
    return kCreators;
}
#endif
