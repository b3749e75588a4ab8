// The webgpu device for TVM on a desktop: a DeviceAPI and a module loader over wgpu-native's C API.
//
// TVM's webgpu code generator writes one WGSL compute shader per kernel. In a browser TVM's JavaScript
// runtime launches them; here this file does, on whatever wgpu-native finds (Vulkan, Metal, D3D12, GL).
// The launch convention it follows is the one the code generator emits:
//   * the kernel's buffer parameters are storage bindings 0..n-1 of group 0, in parameter order,
//     read-only or read-write as the "paramWriteAccess:[...]" launch tag says;
//   * its scalar parameters and the packed grid size share one uniform struct at binding n: 32-bit
//     fields in parameter order, then packGridDimX (the number of x workgroups minus one);
//   * a grid wider than the device allows is folded into z workgroups; the shader recovers the x index
//     as z * gridDim.x + x and returns early past packGridDimX.
// Built on the user's machine by megrez_mlc/webgpu/__init__.py against the installed wheels' headers.

#include <dlpack/dlpack.h>
#include <tvm/ffi/cast.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/runtime/device_api.h>
#include <webgpu.h>
#include <wgpu.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

namespace megrez_webgpu {

using tvm::ffi::Any;
using tvm::ffi::PackedArgs;

[[noreturn]] void Fail(const std::string& message) { TVM_FFI_THROW(RuntimeError) << "webgpu: " << message; }

std::string ToString(WGPUStringView view) {
  if (view.data == nullptr) return "";
  return view.length == WGPU_STRLEN ? std::string(view.data) : std::string(view.data, view.length);
}

WGPUStringView View(const std::string& text) { return WGPUStringView{text.data(), text.size()}; }

uint64_t RoundUp(uint64_t n, uint64_t to) { return (n + to - 1) / to * to; }

// What TVM holds as a webgpu "pointer": the buffer and its (4-byte rounded) size.
struct Buffer {
  WGPUBuffer buffer;
  uint64_t size;
};

// The one adapter, device and queue of this process, opened on first use.
class Context {
 public:
  static Context& Get() {
    static Context* context = new Context();  // never destroyed: buffers may outlive static teardown
    return *context;
  }

  // Opens the adapter of `backend` ("" for wgpu's primary backends). Returns "" or why it cannot.
  std::string Open(const std::string& backend) {
    std::lock_guard<std::recursive_mutex> lock(mutex);
    if (device != nullptr) {
      if (!backend.empty() && backend != backend_name) {
        return "the webgpu adapter is already open on " + backend_name + ", not " + backend;
      }
      return "";
    }
    // A failure is remembered per backend: asking again for it is not retried, another one is.
    auto failed = open_errors.find(backend);
    if (failed != open_errors.end()) return failed->second;
    std::string error = OpenNow(backend);
    if (!error.empty()) {
      if (adapter != nullptr) wgpuAdapterRelease(adapter);
      if (instance != nullptr) wgpuInstanceRelease(instance);
      adapter = nullptr;
      instance = nullptr;
      open_errors[backend] = error;
    }
    return error;
  }

  // Whether a device is open, opening the default backend's when none is (an explicit Open comes first
  // when the user named a backend, and then stays the one in use).
  bool IsOpen() {
    std::lock_guard<std::recursive_mutex> lock(mutex);
    return device != nullptr || Open(DefaultBackend()).empty();
  }

  static std::string DefaultBackend() {
    const char* env = std::getenv("MEGREZ_MLC_WGPU_BACKEND");
    return env == nullptr ? "" : env;
  }

  void Require() {
    std::lock_guard<std::recursive_mutex> lock(mutex);
    if (device != nullptr) return;
    std::string error = Open(DefaultBackend());
    if (!error.empty()) Fail(error);
  }

  // The first uncaptured error since the last call.
  // wgpu-native reports validation errors from inside the failing call, so no poll is needed.
  std::string TakeError() {
    std::string error;
    error.swap(last_error);
    return error;
  }

  // Submits the dispatches recorded so far.
  void Flush() {
    if (encoder == nullptr) return;
    WGPUCommandBufferDescriptor desc = WGPU_COMMAND_BUFFER_DESCRIPTOR_INIT;
    WGPUCommandBuffer commands = wgpuCommandEncoderFinish(encoder, &desc);
    wgpuQueueSubmit(queue, 1, &commands);
    wgpuCommandBufferRelease(commands);
    wgpuCommandEncoderRelease(encoder);
    encoder = nullptr;
    pending_commands = 0;
  }

  WGPUCommandEncoder Encoder() {
    if (encoder == nullptr) {
      WGPUCommandEncoderDescriptor desc = WGPU_COMMAND_ENCODER_DESCRIPTOR_INIT;
      encoder = wgpuDeviceCreateCommandEncoder(device, &desc);
    }
    return encoder;
  }

  // Counts a recorded command; long runs are submitted in pieces so the GPU starts early.
  void Recorded() {
    if (++pending_commands >= kMaxPendingCommands) Flush();
  }

  void Synchronize() {
    Flush();
    bool done = false;
    WGPUQueueWorkDoneCallbackInfo info = WGPU_QUEUE_WORK_DONE_CALLBACK_INFO_INIT;
    info.mode = WGPUCallbackMode_AllowProcessEvents;
    info.callback = [](WGPUQueueWorkDoneStatus, WGPUStringView, void* flag, void*) {
      *static_cast<bool*>(flag) = true;
    };
    info.userdata1 = &done;
    wgpuQueueOnSubmittedWorkDone(queue, info);
    WaitFor(&done);
    std::string error = TakeError();
    if (!error.empty()) Fail(error);
  }

  void WaitFor(const bool* flag) {
    while (!*flag) {
      wgpuDevicePoll(device, true, nullptr);
      wgpuInstanceProcessEvents(instance);
    }
  }

  WGPUBuffer CreateBuffer(uint64_t size, WGPUBufferUsage usage, bool mapped = false) {
    WGPUBufferDescriptor desc = WGPU_BUFFER_DESCRIPTOR_INIT;
    desc.size = size;
    desc.usage = usage;
    desc.mappedAtCreation = mapped;
    return wgpuDeviceCreateBuffer(device, &desc);
  }

  // Copies `size` bytes (multiples of 4) at `offset` of `source` into `out`.
  void ReadBack(WGPUBuffer source, uint64_t offset, uint64_t size, void* out) {
    if (staging_size < size) {
      if (staging != nullptr) wgpuBufferRelease(staging);
      staging_size = std::max<uint64_t>(RoundUp(size, 1 << 16), 1 << 16);
      staging = CreateBuffer(staging_size, WGPUBufferUsage_MapRead | WGPUBufferUsage_CopyDst);
    }
    wgpuCommandEncoderCopyBufferToBuffer(Encoder(), source, offset, staging, 0, size);
    Flush();
    bool mapped = false;
    WGPUMapAsyncStatus status = WGPUMapAsyncStatus_Error;
    struct Result {
      bool* done;
      WGPUMapAsyncStatus* status;
    } result{&mapped, &status};
    WGPUBufferMapCallbackInfo info = WGPU_BUFFER_MAP_CALLBACK_INFO_INIT;
    info.mode = WGPUCallbackMode_AllowProcessEvents;
    info.callback = [](WGPUMapAsyncStatus s, WGPUStringView, void* data, void*) {
      auto* r = static_cast<Result*>(data);
      *r->status = s;
      *r->done = true;
    };
    info.userdata1 = &result;
    wgpuBufferMapAsync(staging, WGPUMapMode_Read, 0, size, info);
    WaitFor(&mapped);
    if (status != WGPUMapAsyncStatus_Success) Fail("reading a buffer back failed: " + TakeError());
    std::memcpy(out, wgpuBufferGetConstMappedRange(staging, 0, size), size);
    wgpuBufferUnmap(staging);
  }

  std::string InfoJson() {
    std::ostringstream os;
    os << "{\"backend\": \"" << backend_name << "\", \"name\": \"" << Escape(adapter_name)
       << "\", \"description\": \"" << Escape(adapter_description) << "\", \"shader_f16\": "
       << (has_f16 ? "true" : "false")
       << ", \"max_storage_buffer_binding_size\": " << limits.maxStorageBufferBindingSize
       << ", \"max_buffer_size\": " << limits.maxBufferSize
       << ", \"max_compute_invocations_per_workgroup\": " << limits.maxComputeInvocationsPerWorkgroup
       << ", \"max_compute_workgroup_storage_size\": " << limits.maxComputeWorkgroupStorageSize
       << ", \"max_compute_workgroups_per_dimension\": " << limits.maxComputeWorkgroupsPerDimension
       << ", \"max_storage_buffers_per_shader_stage\": " << limits.maxStorageBuffersPerShaderStage << "}";
    return os.str();
  }

  std::recursive_mutex mutex;
  WGPUInstance instance = nullptr;
  WGPUAdapter adapter = nullptr;
  WGPUDevice device = nullptr;
  WGPUQueue queue = nullptr;
  WGPULimits limits = WGPU_LIMITS_INIT;
  bool has_f16 = false;
  std::string backend_name;
  std::string adapter_name;
  std::string adapter_description;

 private:
  static constexpr int kMaxPendingCommands = 256;

  static std::string Escape(const std::string& text) {
    std::string out;
    for (char c : text) {
      if (c == '"' || c == '\\') out += '\\';
      if (static_cast<unsigned char>(c) >= 0x20) out += c;
    }
    return out;
  }

  static bool BackendMask(const std::string& name, WGPUInstanceBackend* mask) {
    static const std::unordered_map<std::string, WGPUInstanceBackend> masks = {
        {"", WGPUInstanceBackend_Primary},     {"vulkan", WGPUInstanceBackend_Vulkan},
        {"metal", WGPUInstanceBackend_Metal},  {"dx12", WGPUInstanceBackend_DX12},
        {"gl", WGPUInstanceBackend_GL},
    };
    auto it = masks.find(name);
    if (it == masks.end()) return false;
    *mask = it->second;
    return true;
  }

  static std::string BackendName(WGPUBackendType type) {
    switch (type) {
      case WGPUBackendType_Vulkan:
        return "vulkan";
      case WGPUBackendType_Metal:
        return "metal";
      case WGPUBackendType_D3D12:
        return "dx12";
      case WGPUBackendType_OpenGL:
      case WGPUBackendType_OpenGLES:
        return "gl";
      default:
        return "other";
    }
  }

  std::string OpenNow(const std::string& backend) {
    WGPUInstanceBackend mask;
    if (!BackendMask(backend, &mask)) {
      return "unknown wgpu backend '" + backend + "' (MEGREZ_MLC_WGPU_BACKEND): use vulkan, metal, dx12 or gl";
    }
    WGPUInstanceExtras extras = {};
    extras.chain.sType = static_cast<WGPUSType>(WGPUSType_InstanceExtras);
    extras.backends = mask;
    WGPUInstanceDescriptor instance_desc = WGPU_INSTANCE_DESCRIPTOR_INIT;
    instance_desc.nextInChain = &extras.chain;
    instance = wgpuCreateInstance(&instance_desc);
    if (instance == nullptr) return "wgpu-native could not create an instance";

    struct AdapterResult {
      bool done = false;
      WGPUAdapter adapter = nullptr;
      std::string message;
    } found;
    WGPURequestAdapterOptions options = WGPU_REQUEST_ADAPTER_OPTIONS_INIT;
    options.powerPreference = WGPUPowerPreference_HighPerformance;
    WGPURequestAdapterCallbackInfo adapter_cb = WGPU_REQUEST_ADAPTER_CALLBACK_INFO_INIT;
    adapter_cb.mode = WGPUCallbackMode_AllowProcessEvents;
    adapter_cb.callback = [](WGPURequestAdapterStatus status, WGPUAdapter a, WGPUStringView message,
                             void* data, void*) {
      auto* r = static_cast<AdapterResult*>(data);
      if (status == WGPURequestAdapterStatus_Success) r->adapter = a;
      r->message = ToString(message);
      r->done = true;
    };
    adapter_cb.userdata1 = &found;
    wgpuInstanceRequestAdapter(instance, &options, adapter_cb);
    while (!found.done) wgpuInstanceProcessEvents(instance);
    if (found.adapter == nullptr) {
      std::string which = backend.empty() ? "Vulkan, Metal or D3D12" : backend;
      return "no " + which + " adapter found" + (found.message.empty() ? "" : " (" + found.message + ")");
    }
    adapter = found.adapter;

    WGPUAdapterInfo info = WGPU_ADAPTER_INFO_INIT;
    wgpuAdapterGetInfo(adapter, &info);
    backend_name = BackendName(info.backendType);
    adapter_name = ToString(info.device);
    adapter_description = ToString(info.description);
    wgpuAdapterInfoFreeMembers(info);
    wgpuAdapterGetLimits(adapter, &limits);
    has_f16 = wgpuAdapterHasFeature(adapter, WGPUFeatureName_ShaderF16);

    struct DeviceResult {
      bool done = false;
      WGPUDevice device = nullptr;
      std::string message;
    } made;
    WGPUFeatureName features[] = {WGPUFeatureName_ShaderF16};
    WGPUDeviceDescriptor device_desc = WGPU_DEVICE_DESCRIPTOR_INIT;
    device_desc.requiredFeatureCount = has_f16 ? 1 : 0;
    device_desc.requiredFeatures = features;
    device_desc.requiredLimits = &limits;  // all the adapter offers, not WebGPU's small defaults
    device_desc.uncapturedErrorCallbackInfo.callback = [](WGPUDevice const*, WGPUErrorType,
                                                          WGPUStringView message, void* ctx, void*) {
      auto* self = static_cast<Context*>(ctx);
      if (self->last_error.empty()) self->last_error = ToString(message);
    };
    device_desc.uncapturedErrorCallbackInfo.userdata1 = this;
    WGPURequestDeviceCallbackInfo device_cb = WGPU_REQUEST_DEVICE_CALLBACK_INFO_INIT;
    device_cb.mode = WGPUCallbackMode_AllowProcessEvents;
    device_cb.callback = [](WGPURequestDeviceStatus status, WGPUDevice d, WGPUStringView message, void* data,
                            void*) {
      auto* r = static_cast<DeviceResult*>(data);
      if (status == WGPURequestDeviceStatus_Success) r->device = d;
      r->message = ToString(message);
      r->done = true;
    };
    device_cb.userdata1 = &made;
    wgpuAdapterRequestDevice(adapter, &device_desc, device_cb);
    while (!made.done) wgpuInstanceProcessEvents(instance);
    if (made.device == nullptr) return "the " + backend_name + " adapter refused a device: " + made.message;
    device = made.device;
    queue = wgpuDeviceGetQueue(device);
    return "";
  }

  std::unordered_map<std::string, std::string> open_errors;
  std::string last_error;
  WGPUCommandEncoder encoder = nullptr;
  int pending_commands = 0;
  WGPUBuffer staging = nullptr;
  uint64_t staging_size = 0;
};

// ---------------------------------------------------------------------------------------------------------
// The device: buffers and copies.

class WebGPUDeviceAPI final : public tvm::runtime::DeviceAPI {
 public:
  static WebGPUDeviceAPI* Global() {
    static WebGPUDeviceAPI* api = new WebGPUDeviceAPI();
    return api;
  }

  void SetDevice(DLDevice) final {}

  void GetAttr(DLDevice dev, tvm::runtime::DeviceAttrKind kind, Any* rv) final {
    Context& ctx = Context::Get();
    if (kind == tvm::runtime::kExist) {
      *rv = static_cast<int64_t>(dev.device_id == 0 && ctx.IsOpen());
      return;
    }
    if (!ctx.IsOpen()) return;
    const WGPULimits& limits = ctx.limits;
    switch (kind) {
      case tvm::runtime::kMaxThreadsPerBlock:
        *rv = static_cast<int64_t>(limits.maxComputeInvocationsPerWorkgroup);
        break;
      case tvm::runtime::kWarpSize:
        *rv = static_cast<int64_t>(1);  // WGSL kernels from TVM never assume a subgroup
        break;
      case tvm::runtime::kMaxSharedMemoryPerBlock:
        *rv = static_cast<int64_t>(limits.maxComputeWorkgroupStorageSize);
        break;
      case tvm::runtime::kDeviceName:
        *rv = tvm::ffi::String(ctx.adapter_name);
        break;
      case tvm::runtime::kMaxThreadDimensions: {
        std::ostringstream os;
        os << "[" << limits.maxComputeWorkgroupSizeX << ", " << limits.maxComputeWorkgroupSizeY << ", "
           << limits.maxComputeWorkgroupSizeZ << "]";
        *rv = tvm::ffi::String(os.str());
        break;
      }
      default:
        break;
    }
  }

  void* AllocDataSpace(DLDevice, size_t nbytes, size_t, DLDataType) final {
    Context& ctx = Context::Get();
    ctx.Require();
    std::lock_guard<std::recursive_mutex> lock(ctx.mutex);
    uint64_t size = std::max<uint64_t>(RoundUp(nbytes, 4), 4);
    if (size > ctx.limits.maxBufferSize) {
      std::ostringstream os;
      os << "a buffer of " << nbytes << " bytes exceeds this adapter's maxBufferSize ("
         << ctx.limits.maxBufferSize << ")";
      Fail(os.str());
    }
    WGPUBuffer buffer = ctx.CreateBuffer(
        size, WGPUBufferUsage_Storage | WGPUBufferUsage_CopySrc | WGPUBufferUsage_CopyDst);
    std::string error = ctx.TakeError();
    if (buffer == nullptr || !error.empty()) Fail("cannot allocate a buffer: " + error);
    return new Buffer{buffer, size};
  }

  void FreeDataSpace(DLDevice, void* ptr) final {
    Context& ctx = Context::Get();
    std::lock_guard<std::recursive_mutex> lock(ctx.mutex);
    auto* buffer = static_cast<Buffer*>(ptr);
    // Release only drops our reference: wgpu keeps the buffer alive for the commands that still use it.
    wgpuBufferRelease(buffer->buffer);
    delete buffer;
  }

  void StreamSync(DLDevice, TVMStreamHandle) final {
    Context& ctx = Context::Get();
    std::lock_guard<std::recursive_mutex> lock(ctx.mutex);
    if (ctx.device != nullptr) ctx.Synchronize();
  }

 protected:
  void CopyDataFromTo(const void* from, size_t from_offset, void* to, size_t to_offset, size_t size,
                      DLDevice dev_from, DLDevice dev_to, DLDataType, TVMStreamHandle) final {
    if (size == 0) return;
    Context& ctx = Context::Get();
    ctx.Require();
    std::lock_guard<std::recursive_mutex> lock(ctx.mutex);
    bool from_cpu = dev_from.device_type == kDLCPU;
    bool to_cpu = dev_to.device_type == kDLCPU;
    if (from_cpu && !to_cpu) {
      Write(static_cast<Buffer*>(to), to_offset, static_cast<const char*>(from) + from_offset, size);
    } else if (!from_cpu && to_cpu) {
      Read(static_cast<const Buffer*>(from), from_offset, static_cast<char*>(to) + to_offset, size);
    } else if (!from_cpu && !to_cpu) {
      auto* source = static_cast<const Buffer*>(from);
      auto* target = static_cast<Buffer*>(to);
      if (from_offset % 4 == 0 && to_offset % 4 == 0 && size % 4 == 0) {
        wgpuCommandEncoderCopyBufferToBuffer(ctx.Encoder(), source->buffer, from_offset, target->buffer,
                                             to_offset, size);
        ctx.Recorded();
      } else {  // copies must be whole 32-bit words: go through the host
        std::vector<char> bytes(size);
        Read(source, from_offset, bytes.data(), size);
        Write(target, to_offset, bytes.data(), size);
      }
    } else {
      std::memcpy(static_cast<char*>(to) + to_offset, static_cast<const char*>(from) + from_offset, size);
    }
  }

 private:
  // Host to device. Queue writes take effect before the next submission, so the dispatches recorded so
  // far are submitted first to keep program order; a write that is not whole words patches the words
  // it touches.
  static void Write(Buffer* target, uint64_t offset, const char* data, uint64_t size) {
    Context& ctx = Context::Get();
    ctx.Flush();
    if (offset % 4 == 0 && size % 4 == 0) {
      wgpuQueueWriteBuffer(ctx.queue, target->buffer, offset, data, size);
      return;
    }
    uint64_t begin = offset / 4 * 4;
    uint64_t end = RoundUp(offset + size, 4);
    std::vector<char> words(end - begin);
    ctx.ReadBack(target->buffer, begin, end - begin, words.data());
    std::memcpy(words.data() + (offset - begin), data, size);
    wgpuQueueWriteBuffer(ctx.queue, target->buffer, begin, words.data(), words.size());
  }

  static void Read(const Buffer* source, uint64_t offset, char* out, uint64_t size) {
    Context& ctx = Context::Get();
    uint64_t begin = offset / 4 * 4;
    uint64_t end = RoundUp(offset + size, 4);
    if (begin == offset && end == offset + size) {
      ctx.ReadBack(source->buffer, offset, size, out);
      return;
    }
    std::vector<char> words(end - begin);
    ctx.ReadBack(source->buffer, begin, end - begin, words.data());
    std::memcpy(out, words.data() + (offset - begin), size);
  }
};

// ---------------------------------------------------------------------------------------------------------
// The module: the WGSL of each kernel and how to launch it, as TVM serializes a webgpu module.

struct KernelInfo {
  std::string name;
  std::vector<DLDataType> arg_types;
  std::vector<std::string> launch_tags;  // "blockIdx.x", "threadIdx.x"... (one value each at call time)
  std::vector<bool> writable;            // per buffer parameter, from the "paramWriteAccess:[...]" tag
};

class Reader {
 public:
  explicit Reader(const tvm::ffi::Bytes& bytes) : data_(bytes.data()), size_(bytes.size()) {}

  uint64_t U64() {
    uint64_t value;
    Take(&value, sizeof(value));
    return value;
  }

  std::string String() {
    uint64_t n = U64();
    if (n > size_ - pos_) Fail("truncated webgpu module");
    std::string text(data_ + pos_, n);
    pos_ += n;
    return text;
  }

  DLDataType DataType() {
    DLDataType type;
    Take(&type, sizeof(type));
    return type;
  }

 private:
  void Take(void* out, size_t n) {
    if (n > size_ - pos_) Fail("truncated webgpu module");
    std::memcpy(out, data_ + pos_, n);
    pos_ += n;
  }

  const char* data_;
  size_t size_;
  size_t pos_ = 0;
};

std::vector<bool> ParseWriteAccess(const std::string& tag) {
  // "paramWriteAccess:[0,1,1]"
  std::vector<bool> writable;
  for (char c : tag.substr(tag.find('[') + 1)) {
    if (c == '0' || c == '1') writable.push_back(c == '1');
  }
  return writable;
}

class WebGPUModule : public tvm::ffi::ModuleObj {
 public:
  WebGPUModule(std::unordered_map<std::string, KernelInfo> kernels,
               std::unordered_map<std::string, std::string> shaders, tvm::ffi::Bytes bytes)
      : kernels_(std::move(kernels)), shaders_(std::move(shaders)), bytes_(std::move(bytes)) {}

  const char* kind() const final { return "webgpu"; }
  int GetPropertyMask() const final { return tvm::ffi::Module::kBinarySerializable; }
  tvm::ffi::Bytes SaveToBytes() const final { return bytes_; }

  tvm::ffi::String InspectSource(const tvm::ffi::String&) const final {
    std::string all;
    for (const auto& [name, source] : shaders_) all += "// " + name + "\n" + source + "\n";
    return all;
  }

  tvm::ffi::Optional<tvm::ffi::Function> GetFunction(const tvm::ffi::String& name) final {
    auto it = kernels_.find(name);
    if (it == kernels_.end()) return std::nullopt;
    auto self = tvm::ffi::GetObjectPtr<WebGPUModule>(this);
    const KernelInfo* info = &it->second;
    return tvm::ffi::Function::FromPacked(
        [self, info](PackedArgs args, Any*) { self->Launch(*info, args); });
  }

 private:
  struct Pipeline {
    WGPUComputePipeline pipeline;
    WGPUBindGroupLayout layout;
  };

  const Pipeline& GetPipeline(const KernelInfo& info) {
    auto cached = pipelines_.find(info.name);
    if (cached != pipelines_.end()) return cached->second;
    Context& ctx = Context::Get();
    auto source = shaders_.find(info.name);
    if (source == shaders_.end()) Fail("kernel " + info.name + " has no WGSL source in the module");
    WGPUShaderSourceWGSL wgsl = WGPU_SHADER_SOURCE_WGSL_INIT;
    wgsl.code = View(source->second);
    WGPUShaderModuleDescriptor shader_desc = WGPU_SHADER_MODULE_DESCRIPTOR_INIT;
    shader_desc.nextInChain = &wgsl.chain;
    shader_desc.label = View(info.name);
    WGPUShaderModule shader = wgpuDeviceCreateShaderModule(ctx.device, &shader_desc);
    std::string error = ctx.TakeError();
    if (!error.empty()) Fail("kernel " + info.name + ": the WGSL does not compile: " + error);

    size_t num_buffers = info.writable.size();
    std::vector<WGPUBindGroupLayoutEntry> entries(num_buffers + 1, WGPU_BIND_GROUP_LAYOUT_ENTRY_INIT);
    for (size_t i = 0; i <= num_buffers; ++i) {
      entries[i].binding = static_cast<uint32_t>(i);
      entries[i].visibility = WGPUShaderStage_Compute;
      entries[i].buffer.type = i == num_buffers      ? WGPUBufferBindingType_Uniform
                               : info.writable[i] ? WGPUBufferBindingType_Storage
                                                  : WGPUBufferBindingType_ReadOnlyStorage;
    }
    WGPUBindGroupLayoutDescriptor layout_desc = WGPU_BIND_GROUP_LAYOUT_DESCRIPTOR_INIT;
    layout_desc.entryCount = entries.size();
    layout_desc.entries = entries.data();
    WGPUBindGroupLayout layout = wgpuDeviceCreateBindGroupLayout(ctx.device, &layout_desc);
    WGPUPipelineLayoutDescriptor pipeline_layout_desc = WGPU_PIPELINE_LAYOUT_DESCRIPTOR_INIT;
    pipeline_layout_desc.bindGroupLayoutCount = 1;
    pipeline_layout_desc.bindGroupLayouts = &layout;
    WGPUPipelineLayout pipeline_layout = wgpuDeviceCreatePipelineLayout(ctx.device, &pipeline_layout_desc);
    WGPUComputePipelineDescriptor pipeline_desc = WGPU_COMPUTE_PIPELINE_DESCRIPTOR_INIT;
    pipeline_desc.label = View(info.name);
    pipeline_desc.layout = pipeline_layout;
    pipeline_desc.compute.module = shader;
    pipeline_desc.compute.entryPoint = View(info.name);
    WGPUComputePipeline pipeline = wgpuDeviceCreateComputePipeline(ctx.device, &pipeline_desc);
    wgpuPipelineLayoutRelease(pipeline_layout);
    wgpuShaderModuleRelease(shader);
    error = ctx.TakeError();
    if (pipeline == nullptr || !error.empty()) {
      Fail("kernel " + info.name + ": cannot create its compute pipeline: " + error);
    }
    return pipelines_.emplace(info.name, Pipeline{pipeline, layout}).first->second;
  }

  void Launch(const KernelInfo& info, PackedArgs args) {
    Context& ctx = Context::Get();
    ctx.Require();
    std::lock_guard<std::recursive_mutex> lock(ctx.mutex);
    const Pipeline& pipeline = GetPipeline(info);
    size_t num_buffers = info.writable.size();
    size_t num_args = info.arg_types.size();
    if (static_cast<size_t>(args.size()) != num_args + info.launch_tags.size()) {
      Fail("kernel " + info.name + " called with the wrong number of arguments");
    }

    // The grid: blockIdx extents in order x, y, z; thread extents are compiled into the shader.
    uint64_t grid[3] = {1, 1, 1};
    for (size_t i = 0; i < info.launch_tags.size(); ++i) {
      const std::string& tag = info.launch_tags[i];
      if (tag.rfind("blockIdx.", 0) == 0) grid[tag.back() - 'x'] = args[num_args + i].cast<int64_t>();
    }
    if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0) return;  // an empty batch: nothing to run
    uint64_t limit = ctx.limits.maxComputeWorkgroupsPerDimension;
    uint64_t fold = (grid[0] + limit - 1) / limit;  // z workgroups that carry the rest of a wide x
    uint64_t grid_x = (grid[0] + fold - 1) / fold;
    if (grid[1] > limit || grid[2] > 1) {
      Fail("kernel " + info.name + ": its grid exceeds what the device launches");
    }

    // The uniform: one 32-bit word per scalar argument, then packGridDimX.
    std::vector<uint32_t> words;
    for (size_t i = num_buffers; i < num_args; ++i) {
      DLDataType type = info.arg_types[i];
      uint32_t word;
      if (type.code == kDLFloat) {
        float value = static_cast<float>(args[i].cast<double>());
        std::memcpy(&word, &value, 4);
      } else {
        word = static_cast<uint32_t>(args[i].cast<int64_t>());
      }
      words.push_back(word);
    }
    words.push_back(static_cast<uint32_t>(grid[0] - 1));
    uint64_t uniform_size = RoundUp(words.size() * 4, 16);
    WGPUBuffer uniform =
        ctx.CreateBuffer(uniform_size, WGPUBufferUsage_Uniform | WGPUBufferUsage_CopyDst, true);
    std::memcpy(wgpuBufferGetMappedRange(uniform, 0, uniform_size), words.data(), words.size() * 4);
    wgpuBufferUnmap(uniform);

    std::vector<WGPUBindGroupEntry> entries(num_buffers + 1, WGPU_BIND_GROUP_ENTRY_INIT);
    for (size_t i = 0; i < num_buffers; ++i) {
      auto* buffer = static_cast<Buffer*>(args[i].cast<void*>());
      entries[i].binding = static_cast<uint32_t>(i);
      entries[i].buffer = buffer->buffer;
      entries[i].size = buffer->size;
    }
    entries[num_buffers].binding = static_cast<uint32_t>(num_buffers);
    entries[num_buffers].buffer = uniform;
    entries[num_buffers].size = uniform_size;
    WGPUBindGroupDescriptor group_desc = WGPU_BIND_GROUP_DESCRIPTOR_INIT;
    group_desc.layout = pipeline.layout;
    group_desc.entryCount = entries.size();
    group_desc.entries = entries.data();
    WGPUBindGroup group = wgpuDeviceCreateBindGroup(ctx.device, &group_desc);

    WGPUComputePassDescriptor pass_desc = WGPU_COMPUTE_PASS_DESCRIPTOR_INIT;
    WGPUComputePassEncoder pass = wgpuCommandEncoderBeginComputePass(ctx.Encoder(), &pass_desc);
    wgpuComputePassEncoderSetPipeline(pass, pipeline.pipeline);
    wgpuComputePassEncoderSetBindGroup(pass, 0, group, 0, nullptr);
    wgpuComputePassEncoderDispatchWorkgroups(pass, static_cast<uint32_t>(grid_x),
                                             static_cast<uint32_t>(grid[1]), static_cast<uint32_t>(fold));
    wgpuComputePassEncoderEnd(pass);
    wgpuComputePassEncoderRelease(pass);
    wgpuBindGroupRelease(group);
    wgpuBufferRelease(uniform);
    std::string error = ctx.TakeError();
    if (!error.empty()) Fail("kernel " + info.name + ": " + error);
    ctx.Recorded();
  }

  std::unordered_map<std::string, KernelInfo> kernels_;
  std::unordered_map<std::string, std::string> shaders_;
  std::unordered_map<std::string, Pipeline> pipelines_;
  tvm::ffi::Bytes bytes_;
};

tvm::ffi::Module LoadFromBytes(const tvm::ffi::Bytes& bytes) {
  Reader reader(bytes);
  std::unordered_map<std::string, KernelInfo> kernels;
  for (uint64_t n = reader.U64(); n > 0; --n) {
    std::string key = reader.String();
    KernelInfo info;
    info.name = reader.String();
    for (uint64_t k = reader.U64(); k > 0; --k) info.arg_types.push_back(reader.DataType());
    for (uint64_t k = reader.U64(); k > 0; --k) {
      std::string tag = reader.String();
      if (tag.rfind("paramWriteAccess:", 0) == 0) {
        info.writable = ParseWriteAccess(tag);
      } else if (tag.rfind("blockIdx.", 0) == 0 || tag.rfind("threadIdx.", 0) == 0) {
        info.launch_tags.push_back(tag);
      } else {
        Fail("kernel " + info.name + " needs launch parameter " + tag + ", which the webgpu runtime lacks");
      }
    }
    if (reader.U64() != 0) Fail("kernel " + info.name + " has argument tags the webgpu runtime lacks");
    size_t num_buffers = std::count_if(info.arg_types.begin(), info.arg_types.end(),
                                       [](DLDataType t) { return t.code == kDLOpaqueHandle; });
    if (info.writable.size() != num_buffers) info.writable.assign(num_buffers, true);
    kernels.emplace(key, std::move(info));
  }
  std::unordered_map<std::string, std::string> shaders;
  for (uint64_t n = reader.U64(); n > 0; --n) {
    std::string key = reader.String();
    shaders.emplace(key, reader.String());
  }
  return tvm::ffi::Module(tvm::ffi::make_object<WebGPUModule>(std::move(kernels), std::move(shaders), bytes));
}

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      .def_packed("device_api.webgpu",
                  [](PackedArgs, Any* rv) { *rv = static_cast<void*>(WebGPUDeviceAPI::Global()); })
      .def("ffi.Module.load_from_bytes.webgpu", LoadFromBytes)
      .def("megrez_webgpu.open",
           [](const tvm::ffi::String& backend) -> tvm::ffi::String {
             return Context::Get().Open(std::string(backend));
           })
      .def("megrez_webgpu.adapter_info", []() -> tvm::ffi::String {
        Context::Get().Require();
        return Context::Get().InfoJson();
      });
}

}  // namespace megrez_webgpu
